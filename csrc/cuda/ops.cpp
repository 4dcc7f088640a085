// Torch glue of the CUDA kernels: tensors in, CudaPairRowsParams out, kernels launched on torch's current stream,
// ops registered as torch.ops.metric_kernels.cuda_* (their fake implementations and autograd formula come from
// Python, metric_kernels/_fused.py, shared with the other fused backends). It needs no CUDA header: the stream is
// reached through c10's device-generic interface, so this file also compiles against a CPU-only torch (the CI
// compile check does that).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../op_glue.h"
#include "../params.h"
#include "launch.h"

namespace metric_kernels {
namespace {

void* current_stream(const at::Tensor& tensor) {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(tensor.device()).native_handle();
}

void check_launch(int code, const char* op) {
  TORCH_CHECK(code == 0, "metric_kernels::", op, ": CUDA error: ", cuda::error_string(code));
}

// fp32 tiles go to tensor cores in tf32 only where torch allows it for matmuls (torch.backends.cuda.matmul.allow_tf32,
// torch.set_float32_matmul_precision("high"/"medium")).
Operand operand_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kHalf: return Operand::kFloat16;
    case at::kBFloat16: return Operand::kBFloat16;
    case at::kDouble: return Operand::kFloat64;
    default: return at::globalContext().allowTF32CuBLAS() ? Operand::kTf32 : Operand::kFloat32;
  }
}

at::ScalarType accumulation_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_cuda(const glue::Rows& rows) {
  const at::Tensor& x = rows.x;
  TORCH_CHECK(x.is_cuda() && rows.y.device() == x.device() && rows.x_labels.device() == x.device() &&
                  rows.y_labels.device() == x.device(),
              "metric_kernels cuda ops take CUDA tensors on one device");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "metric_kernels cuda ops take float32, float64, float16 or bfloat16 rows");
  TORCH_CHECK(x.size(1) <= int64_t{65535} * 64, "D is limited to 65535 * 64 by the grid of the backward kernels");
}

CudaPairRowsParams make_params(const at::Tensor& x, const at::Tensor& y, const at::Tensor& x_labels,
                               const at::Tensor& y_labels, int64_t self_offset, int64_t kind, double a, double b) {
  return CudaPairRowsParams{x.data_ptr(),  y.data_ptr(),  x_labels.data_ptr<int64_t>(), y_labels.data_ptr<int64_t>(),
                            x.size(0),     y.size(0),     x.size(1),                    x.stride(0),
                            y.stride(0),   self_offset,   static_cast<int>(kind),       a,
                            b,             operand_of(x)};
}

at::Tensor lse_rows(const at::Tensor& x_in, const std::optional<at::Tensor>& y_in, const at::Tensor& x_labels_in,
                    const at::Tensor& y_labels_in, int64_t self_offset, int64_t kind, double a, double b,
                    bool deterministic) {
  const glue::Rows rows = glue::prepare_rows(x_in, y_in, x_labels_in, y_labels_in);
  check_cuda(rows);
  const auto& [x, y, x_labels, y_labels, same] = rows;
  const c10::DeviceGuard guard(x.device());
  at::Tensor stats = at::empty({3, x.size(0)}, x.options().dtype(accumulation_type(x)));
  check_launch(cuda::lse_rows_forward(make_params(x, y, x_labels, y_labels, self_offset, kind, a, b),
                                      stats.data_ptr(), current_stream(x)),
               "cuda_lse_rows");
  return stats;
}

// (dX, dY) in the rows' dtype; an unneeded gradient has 0 rows; without y (the references are the queries) dX holds
// the whole gradient. Deterministic unless asked otherwise and torch's deterministic mode is off: then dY comes from
// the dX pass through atomics (one pass instead of two).
std::tuple<at::Tensor, at::Tensor> lse_rows_backward(const at::Tensor& grad_in, const at::Tensor& stats_in,
                                                     const at::Tensor& x_in, const std::optional<at::Tensor>& y_in,
                                                     const at::Tensor& x_labels_in, const at::Tensor& y_labels_in,
                                                     int64_t self_offset, int64_t kind, double a, double b,
                                                     bool deterministic, bool need_dx, bool need_dy) {
  const glue::Rows rows = glue::prepare_rows(x_in, y_in, x_labels_in, y_labels_in);
  check_cuda(rows);
  glue::check_row_state(grad_in, stats_in, rows);
  const auto& [x, y, x_labels, y_labels, same] = rows;
  const c10::DeviceGuard guard(x.device());
  const auto acc = accumulation_type(x);
  const at::Tensor grad = grad_in.to(acc).contiguous(), stats = stats_in.to(acc).contiguous();
  if (same) need_dx = need_dx || need_dy, need_dy = false;
  const CudaPairRowsParams params = make_params(x, y, x_labels, y_labels, self_offset, kind, a, b);
  const int64_t shared_limit = cuda::shared_bytes_per_block(x.get_device());
  // Atomics only where they save a pass: both gradients wanted (dY alone is one deterministic pass already).
  const bool atomic = !deterministic && !at::globalContext().deterministicAlgorithms() && need_dx &&
                      (need_dy || same) && cuda::supports_atomic_backward(params.operand) &&
                      cuda::backward_shared_bytes(params.operand, true) <= shared_limit;
  const int64_t shared_bytes = cuda::backward_shared_bytes(params.operand, atomic);
  TORCH_CHECK(shared_bytes <= shared_limit, "metric_kernels::cuda_lse_rows_backward: the ", x.scalar_type(),
              " backward needs ", shared_bytes, " bytes of shared memory per block and this GPU allows ", shared_limit,
              "; use float32 rows or backend='triton'");
  const auto options = x.options().dtype(acc);
  // The atomic pass adds into zeros; the deterministic passes write every element.
  const auto buffer = [&](int64_t rows, bool zeroed) {
    return zeroed ? at::zeros({rows, x.size(1)}, options) : at::empty({rows, x.size(1)}, options);
  };
  at::Tensor dx = buffer(need_dx ? x.size(0) : 0, atomic && same);
  at::Tensor dy = same ? dx : buffer(need_dy ? y.size(0) : 0, atomic);
  // With no pairs (N, M or D zero) the gradients are zeros and no kernel runs.
  if (x.size(0) > 0 && y.size(0) > 0 && x.size(1) > 0 && (need_dx || need_dy)) {
    CudaPairRowsBackwardParams backward{params,
                                        grad.data_ptr(),
                                        stats.data_ptr(),
                                        need_dx ? dx.data_ptr() : nullptr,
                                        need_dy || same ? dy.data_ptr() : nullptr,
                                        same,
                                        atomic};
    check_launch(cuda::lse_rows_backward(backward, current_stream(x)), "cuda_lse_rows_backward");
  } else {
    dx.zero_(), dy.zero_();
  }
  at::Tensor dy_out = same ? at::empty({0, x.size(1)}, x.options()) : dy.to(y.scalar_type());
  return {dx.to(x.scalar_type()), dy_out};
}

at::Tensor batch_hard_select(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& x_labels_in,
                             const at::Tensor& y_labels_in, int64_t self_offset) {
  const glue::Rows rows = glue::prepare_rows(x_in, y_in, x_labels_in, y_labels_in);
  check_cuda(rows);
  const auto& [x, y, x_labels, y_labels, same] = rows;
  const c10::DeviceGuard guard(x.device());
  const auto acc = accumulation_type(x);
  const at::Tensor x_sq = x.to(acc).pow(2).sum(1), y_sq = y.to(acc).pow(2).sum(1);
  at::Tensor choices = at::empty({2, x.size(0)}, x_labels.options());
  check_launch(cuda::batch_hard_select(make_params(x, y, x_labels, y_labels, self_offset, 0, 0, 0), x_sq.data_ptr(),
                                       y_sq.data_ptr(), choices.data_ptr<int64_t>(), current_stream(x)),
               "cuda_batch_hard_select");
  return choices;
}

}  // namespace
}  // namespace metric_kernels

TORCH_LIBRARY_FRAGMENT(metric_kernels, m) { metric_kernels::glue::define_fused_ops(m, "cuda"); }

TORCH_LIBRARY_IMPL(metric_kernels, CUDA, m) {
  m.impl("cuda_lse_rows", &metric_kernels::lse_rows);
  m.impl("cuda_lse_rows_backward", &metric_kernels::lse_rows_backward);
  m.impl("cuda_batch_hard_select", &metric_kernels::batch_hard_select);
}
