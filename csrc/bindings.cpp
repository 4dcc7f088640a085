// Torch glue of metric_kernels._C: tensors in, params structs out, kernels called, ops registered with
// TORCH_LIBRARY so they are torch.ops.metric_kernels.* (fake implementations and autograd formulas are registered
// from Python, in metric_kernels/_lse_op.py, shared with the Triton ops).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cpu/pair_rows.h"
#include "op_glue.h"

namespace metric_kernels {
namespace {

// The kernels' GEMM on tiles, through ATen (MKL or OpenBLAS). Called inside the kernels' OpenMP regions, where
// ATen and the BLAS run single-threaded.
template <typename T>
void aten_gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
               const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto* a_data = const_cast<T*>(a);
  auto* b_data = const_cast<T*>(b);
  at::Tensor A = transpose_a ? at::from_blob(a_data, {k, m}, {lda, 1}, options).t()
                             : at::from_blob(a_data, {m, k}, {lda, 1}, options);
  at::Tensor B = transpose_b ? at::from_blob(b_data, {n, k}, {ldb, 1}, options).t()
                             : at::from_blob(b_data, {k, n}, {ldb, 1}, options);
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, options);
  if (beta == T(0)) {
    at::mm_out(C, A, B);
  } else {
    C.addmm_(A, B, beta, 1);
  }
}

void check_cpu(const glue::Rows& rows) {
  TORCH_CHECK(rows.x.device().is_cpu() && rows.y.device().is_cpu(), "metric_kernels cpu ops take CPU tensors");
  TORCH_CHECK(rows.x.scalar_type() == at::kFloat || rows.x.scalar_type() == at::kDouble,
              "metric_kernels cpu ops compute in float32 or float64");
}

template <typename T>
PairRowsParams<T> make_params(const glue::Rows& rows, const glue::RowNorms& norms, int64_t self_offset, int64_t kind,
                              int64_t pair_value, double a, double b) {
  const auto& [x, y, x_labels, y_labels, same] = rows;
  const auto pointer = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
  return PairRowsParams<T>{x.data_ptr<T>(), y.data_ptr<T>(), x_labels.data_ptr<int64_t>(),
                           y_labels.data_ptr<int64_t>(), x.size(0), y.size(0), x.size(1), x.stride(0), y.stride(0),
                           self_offset, static_cast<int>(kind), static_cast<T>(a), static_cast<T>(b),
                           &aten_gemm<T>, at::get_num_threads(), static_cast<int>(pair_value), pointer(norms.x_sq),
                           pointer(norms.y_sq)};
}

at::Tensor lse_rows(const at::Tensor& x_in, const std::optional<at::Tensor>& y_in, const at::Tensor& x_labels_in,
                    const at::Tensor& y_labels_in, int64_t self_offset, int64_t kind, int64_t pair_value, double a,
                    double b, bool deterministic) {
  glue::check_kind(kind, "lse_rows");
  glue::check_pair_value(pair_value, "lse_rows");
  const glue::Rows rows = glue::prepare_rows(x_in, y_in, x_labels_in, y_labels_in);
  check_cpu(rows);
  const at::Tensor& x = rows.x;
  const glue::RowNorms norms = glue::row_norms(rows, x.scalar_type(), glue::needs_norms(pair_value));
  at::Tensor stats = at::empty({kStatRows, x.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metric_kernels::cpu_lse_rows", [&] {
    cpu::lse_rows_forward(make_params<scalar_t>(rows, norms, self_offset, kind, pair_value, a, b),
                          stats.data_ptr<scalar_t>());
  });
  return stats;
}

// (dX, dY); an unneeded gradient comes back with 0 rows. Without y (the references are the queries) dX holds the
// whole gradient. The CPU backward is always deterministic: `deterministic` is accepted for a uniform signature.
std::tuple<at::Tensor, at::Tensor> lse_rows_backward(const at::Tensor& grad_in, const at::Tensor& stats_in,
                                                     const at::Tensor& x_in, const std::optional<at::Tensor>& y_in,
                                                     const at::Tensor& x_labels_in, const at::Tensor& y_labels_in,
                                                     int64_t self_offset, int64_t kind, int64_t pair_value,
                                                     double a, double b, bool deterministic, bool need_dx,
                                                     bool need_dy) {
  glue::check_kind(kind, "lse_rows_backward");
  glue::check_pair_value(pair_value, "lse_rows_backward");
  const glue::Rows rows = glue::prepare_rows(x_in, y_in, x_labels_in, y_labels_in);
  check_cpu(rows);
  glue::check_row_state(grad_in, stats_in, rows);
  const auto& [x, y, x_labels, y_labels, same] = rows;
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous(), stats = stats_in.to(x.scalar_type()).contiguous();
  const glue::RowNorms norms = glue::row_norms(rows, x.scalar_type(), glue::needs_norms(pair_value));
  if (same) need_dx = need_dx || need_dy, need_dy = false;
  at::Tensor dx = at::empty({need_dx ? x.size(0) : 0, x.size(1)}, x.options());
  at::Tensor dy = at::empty({need_dy ? y.size(0) : 0, y.size(1)}, y.options());
  if (x.size(1) > 0 && (need_dx || need_dy)) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metric_kernels::cpu_lse_rows_backward", [&] {
      PairRowsBackwardParams<scalar_t> params{
          make_params<scalar_t>(rows, norms, self_offset, kind, pair_value, a, b), grad.data_ptr<scalar_t>(),
          stats.data_ptr<scalar_t>(), need_dx ? dx.data_ptr<scalar_t>() : nullptr,
          need_dy ? dy.data_ptr<scalar_t>() : nullptr, false};
      if (same) params.dy = params.dx, params.accumulate_dy = true;
      cpu::lse_rows_backward(params);
    });
  } else {
    dx.zero_(), dy.zero_();
  }
  return {dx, dy};
}

at::Tensor batch_hard_select(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& x_labels_in,
                             const at::Tensor& y_labels_in, int64_t self_offset) {
  const glue::Rows rows = glue::prepare_rows(x_in, y_in, x_labels_in, y_labels_in);
  check_cpu(rows);
  at::Tensor choices = at::empty({2, rows.x.size(0)}, rows.x_labels.options());
  const glue::RowNorms norms = glue::row_norms(rows, rows.x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(rows.x.scalar_type(), "metric_kernels::cpu_batch_hard_select", [&] {
    cpu::batch_hard_select(make_params<scalar_t>(rows, norms, self_offset, 0, 0, 0, 0), choices.data_ptr<int64_t>());
  });
  return choices;
}

}  // namespace
}  // namespace metric_kernels

// A fragment: the Triton ops (defined from Python) share the metric_kernels namespace.
TORCH_LIBRARY_FRAGMENT(metric_kernels, m) { metric_kernels::glue::define_fused_ops(m, "cpu"); }

TORCH_LIBRARY_IMPL(metric_kernels, CPU, m) {
  m.impl("cpu_lse_rows", &metric_kernels::lse_rows);
  m.impl("cpu_lse_rows_backward", &metric_kernels::lse_rows_backward);
  m.impl("cpu_batch_hard_select", &metric_kernels::batch_hard_select);
}

// Importing metric_kernels._C runs the registrations above; the module itself exposes only what it was built with.
PYBIND11_MODULE(_C, module) {
  module.doc() = "metric_kernels native kernels (registered as torch.ops.metric_kernels.*)";
  module.attr("with_cuda") = static_cast<bool>(METRIC_KERNELS_WITH_CUDA);
  module.attr("with_cuda_emulation") = true;  // the cuda_emulated_* ops (csrc/cuda/emulated_ops.cpp)
}
