// Torch glue of the CUDA kernels: tensors in, CudaPairRowsParams out, kernels launched on torch's current stream,
// ops registered as torch.ops.metric_kernels.cuda_* (their fake implementations and autograd formula come from
// Python, metric_kernels/_fused.py, shared with the other fused backends). It needs no CUDA header: the stream is
// reached through c10's device-generic interface, so this file also compiles against a CPU-only torch (the CI
// compile check does that).
//
// emulated_ops.cpp compiles this file a second time with METRIC_KERNELS_HOST_EMULATION: the same glue over the kernels
// built for the host emulation (host_emulation.h), as the ops cuda_emulated_* on CPU tensors.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "../op_glue.h"
#include "../params.h"

#ifdef METRIC_KERNELS_HOST_EMULATION
// The emulated kernels' entry points are metric_kernels::cuda_emulated::* (CMakeLists.txt builds them so).
#define cuda cuda_emulated
#define METRIC_KERNELS_OPS_DISPATCH CPU
#else
#define METRIC_KERNELS_OPS_DISPATCH CUDA
#endif
#include "launch.h"

namespace metric_kernels {
namespace {

#ifdef METRIC_KERNELS_HOST_EMULATION
constexpr const char* kPrefix = "cuda_emulated";
constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;

void* current_stream(const at::Tensor&) { return nullptr; }  // launches complete before they return

// Outputs the kernels must write in full start as NaN (-1 for indices), so an element they miss shows.
at::Tensor uninitialized(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  if (at::isFloatingType(out.scalar_type())) return out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out.fill_(-1);
}
#else
constexpr const char* kPrefix = "cuda";
constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;

void* current_stream(const at::Tensor& tensor) {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(tensor.device()).native_handle();
}

at::Tensor uninitialized(at::IntArrayRef sizes, const at::TensorOptions& options) { return at::empty(sizes, options); }
#endif

void check_launch(int code, const char* op) {
  TORCH_CHECK(code == 0, "metric_kernels::", kPrefix, "_", op, ": CUDA error: ", cuda::error_string(code));
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
  TORCH_CHECK(x.device().type() == kDevice && rows.y.device() == x.device() && rows.x_labels.device() == x.device() &&
                  rows.y_labels.device() == x.device(),
              "metric_kernels ", kPrefix, " ops take ", c10::DeviceTypeName(kDevice), " tensors on one device");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "metric_kernels ", kPrefix, " ops take float32, float64, float16 or bfloat16 rows");
  TORCH_CHECK(x.size(1) <= int64_t{65535} * 64, "D is limited to 65535 * 64 by the grid of the backward kernels");
}

CudaPairRowsParams make_params(const glue::Rows& rows, const glue::RowNorms& norms, int64_t self_offset, int64_t kind,
                               int64_t pair_value, double a, double b) {
  const auto& [x, y, x_labels, y_labels, same] = rows;
  const auto pointer = [](const at::Tensor& t) -> const void* { return t.defined() ? t.data_ptr() : nullptr; };
  return CudaPairRowsParams{x.data_ptr(), y.data_ptr(), x_labels.data_ptr<int64_t>(), y_labels.data_ptr<int64_t>(),
                            x.size(0), y.size(0), x.size(1), x.stride(0), y.stride(0), self_offset,
                            static_cast<int>(kind), a, b, operand_of(x), static_cast<int>(pair_value),
                            pointer(norms.x_sq), pointer(norms.y_sq)};
}

at::Tensor lse_rows(const at::Tensor& x_in, const std::optional<at::Tensor>& y_in, const at::Tensor& x_labels_in,
                    const at::Tensor& y_labels_in, int64_t self_offset, int64_t kind, int64_t pair_value, double a,
                    double b, bool deterministic) {
  glue::check_kind(kind, "lse_rows");
  glue::check_pair_value(pair_value, "lse_rows");
  const glue::Rows rows = glue::prepare_rows(x_in, y_in, x_labels_in, y_labels_in);
  check_cuda(rows);
  const at::Tensor& x = rows.x;
  const c10::DeviceGuard guard(x.device());
  const glue::RowNorms norms = glue::row_norms(rows, accumulation_type(x), glue::needs_norms(pair_value));
  at::Tensor stats = uninitialized({kStatRows, x.size(0)}, x.options().dtype(accumulation_type(x)));
  check_launch(cuda::lse_rows_forward(make_params(rows, norms, self_offset, kind, pair_value, a, b), stats.data_ptr(),
                                      current_stream(x)),
               "lse_rows");
  return stats;
}

// (dX, dY) in the rows' dtype; an unneeded gradient has 0 rows; without y (the references are the queries) dX holds
// the whole gradient. Deterministic unless asked otherwise and torch's deterministic mode is off: then dY comes from
// the dX pass through atomics (one pass instead of two).
std::tuple<at::Tensor, at::Tensor> lse_rows_backward(const at::Tensor& grad_in, const at::Tensor& stats_in,
                                                     const at::Tensor& x_in, const std::optional<at::Tensor>& y_in,
                                                     const at::Tensor& x_labels_in, const at::Tensor& y_labels_in,
                                                     int64_t self_offset, int64_t kind, int64_t pair_value,
                                                     double a, double b, bool deterministic, bool need_dx,
                                                     bool need_dy) {
  glue::check_kind(kind, "lse_rows_backward");
  glue::check_pair_value(pair_value, "lse_rows_backward");
  const glue::Rows rows = glue::prepare_rows(x_in, y_in, x_labels_in, y_labels_in);
  check_cuda(rows);
  glue::check_row_state(grad_in, stats_in, rows);
  const auto& [x, y, x_labels, y_labels, same] = rows;
  const c10::DeviceGuard guard(x.device());
  const auto acc = accumulation_type(x);
  const at::Tensor grad = grad_in.to(acc).contiguous(), stats = stats_in.to(acc).contiguous();
  if (same) need_dx = need_dx || need_dy, need_dy = false;
  const glue::RowNorms norms = glue::row_norms(rows, acc, glue::needs_norms(pair_value));
  const CudaPairRowsParams params = make_params(rows, norms, self_offset, kind, pair_value, a, b);
  const int64_t shared_limit = cuda::shared_bytes_per_block(x.get_device());
  // Atomics only where they save a pass: both gradients wanted (dY alone is one deterministic pass already).
  const bool atomic = !deterministic && !at::globalContext().deterministicAlgorithms() && need_dx &&
                      (need_dy || same) && cuda::supports_atomic_backward(params.operand) &&
                      cuda::backward_shared_bytes(params.operand, true) <= shared_limit;
  const int64_t shared_bytes = cuda::backward_shared_bytes(params.operand, atomic);
  TORCH_CHECK(shared_bytes <= shared_limit, "metric_kernels::", kPrefix, "_lse_rows_backward: the ", x.scalar_type(),
              " backward needs ", shared_bytes, " bytes of shared memory per block and this GPU allows ", shared_limit,
              "; use float32 rows or backend='triton'");
  const auto options = x.options().dtype(acc);
  // The atomic pass adds into zeros; the deterministic passes write every element.
  const auto buffer = [&](int64_t rows, bool zeroed) {
    return zeroed ? at::zeros({rows, x.size(1)}, options) : uninitialized({rows, x.size(1)}, options);
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
    check_launch(cuda::lse_rows_backward(backward, current_stream(x)), "lse_rows_backward");
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
  const at::Tensor& x = rows.x;
  const c10::DeviceGuard guard(x.device());
  const glue::RowNorms norms = glue::row_norms(rows, accumulation_type(x));
  at::Tensor choices = uninitialized({2, x.size(0)}, rows.x_labels.options());
  check_launch(cuda::batch_hard_select(make_params(rows, norms, self_offset, 0, 0, 0, 0), choices.data_ptr<int64_t>(),
                                       current_stream(x)),
               "batch_hard_select");
  return choices;
}

}  // namespace
}  // namespace metric_kernels

TORCH_LIBRARY_FRAGMENT(metric_kernels, m) { metric_kernels::glue::define_fused_ops(m, metric_kernels::kPrefix); }

TORCH_LIBRARY_IMPL(metric_kernels, METRIC_KERNELS_OPS_DISPATCH, m) {
  const std::string prefix = metric_kernels::kPrefix;
  m.impl((prefix + "_lse_rows").c_str(), &metric_kernels::lse_rows);
  m.impl((prefix + "_lse_rows_backward").c_str(), &metric_kernels::lse_rows_backward);
  m.impl((prefix + "_batch_hard_select").c_str(), &metric_kernels::batch_hard_select);
}
