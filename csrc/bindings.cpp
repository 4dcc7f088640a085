// Torch glue of the CPU kernels: tensors in, params structs out, kernels called, ops registered with
// STABLE_TORCH_LIBRARY so they are torch.ops.metric_kernels.cpu_* once metric_kernels/_native.py has loaded the
// library (fake implementations and autograd formulas are registered from Python, in metric_kernels/_fused.py, shared
// with the other fused backends). Stable ABI only: see op_glue.h.
#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cpu.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <unordered_map>

#include "cpu/margin_softmax.h"
#include "cpu/pair_rows.h"
#include "cpu/triplet_margin.h"
#include "op_glue.h"

namespace metric_kernels {
namespace {

using glue::ScalarType;
using glue::Tensor;

// The kernels' GEMM on tiles: the C shim's out= variants of ATen's CPU mm / addmm (MKL or OpenBLAS) on views of the
// caller's buffers, so the product lands in place, as at::mm_out would put it. Called inside the kernels' OpenMP
// regions, where ATen and the BLAS run single-threaded. A failure here would stop the process (an exception cannot
// leave an OpenMP region), as it did with ATen's own calls.
template <typename T>
void shim_gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
               const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const auto view = [](const T* data, int64_t rows, int64_t cols, int64_t ld, bool transposed) {
    // op(M) is rows x cols; M itself is stored row-major with leading dimension ld (cols x rows when transposed)
    const std::array<int64_t, 2> sizes{rows, cols};
    const std::array<int64_t, 2> strides = transposed ? std::array<int64_t, 2>{1, ld} : std::array<int64_t, 2>{ld, 1};
    return torch::stable::from_blob(const_cast<T*>(data), sizes, strides,
                                    torch::stable::Device(torch::headeronly::DeviceType::CPU),
                                    torch::headeronly::CppTypeToScalarType<T>::value);
  };
  const Tensor A = view(a, m, k, lda, transpose_a), B = view(b, k, n, ldb, transpose_b), C = view(c, m, n, ldc, false);
  if (beta == T(0)) {
    STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_mm_out(C.get(), A.get(), B.get()));
  } else {  // C = beta C + A B, C both the input and the output (as addmm_ does: no copy of C into itself)
    STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_addmm_out(C.get(), C.get(), A.get(), B.get(), beta, 1.0));
  }
}

void check_cpu(const glue::Rows& rows) {
  STD_TORCH_CHECK(rows.x.is_cpu() && rows.y.is_cpu(), "metric_kernels cpu ops take CPU tensors");
  STD_TORCH_CHECK(rows.x.scalar_type() == ScalarType::Float || rows.x.scalar_type() == ScalarType::Double,
                  "metric_kernels cpu ops compute in float32 or float64");
}

// Calls body(T{}) with T the rows' type, float or double (check_cpu refuses the others).
template <typename Body>
void with_rows_type(ScalarType type, Body&& body) {
  if (type == ScalarType::Double) {
    body(double{});
  } else {
    body(float{});
  }
}

template <typename T>
PairRowsParams<T> make_params(const glue::Rows& rows, const glue::RowNorms& norms, int64_t self_offset, int64_t kind,
                              int64_t pair_value, double a, double b) {
  const auto& [x, y, x_labels, y_labels, same] = rows;
  const auto pointer = [](const std::optional<Tensor>& t) { return t ? t->const_data_ptr<T>() : nullptr; };
  return PairRowsParams<T>{x.const_data_ptr<T>(), y.const_data_ptr<T>(), x_labels.const_data_ptr<int64_t>(),
                           y_labels.const_data_ptr<int64_t>(), x.size(0), y.size(0), x.size(1), x.stride(0),
                           y.stride(0), self_offset, static_cast<int>(kind), static_cast<T>(a), static_cast<T>(b),
                           &shim_gemm<T>, static_cast<int>(torch::stable::get_num_threads()),
                           static_cast<int>(pair_value), pointer(norms.x_sq), pointer(norms.y_sq)};
}

Tensor lse_rows(const Tensor& x_in, const std::optional<Tensor>& y_in, const Tensor& x_labels_in,
                const Tensor& y_labels_in, int64_t self_offset, int64_t kind, int64_t pair_value, double a, double b,
                bool deterministic) {
  glue::check_kind(kind, "lse_rows");
  glue::check_pair_value(pair_value, "lse_rows");
  const glue::Rows rows = glue::prepare_rows(x_in, y_in, x_labels_in, y_labels_in);
  check_cpu(rows);
  const Tensor& x = rows.x;
  const glue::RowNorms norms = glue::row_norms(rows, x.scalar_type(), glue::needs_norms(pair_value));
  Tensor stats = torch::stable::new_empty(x, {kStatRows, x.size(0)});
  with_rows_type(x.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    cpu::lse_rows_forward(make_params<T>(rows, norms, self_offset, kind, pair_value, a, b),
                          stats.mutable_data_ptr<T>());
  });
  return stats;
}

// (dX, dY); an unneeded gradient comes back with 0 rows. Without y (the references are the queries) dX holds the
// whole gradient. The CPU backward is always deterministic: `deterministic` is accepted for a uniform signature.
std::tuple<Tensor, Tensor> lse_rows_backward(const Tensor& grad_in, const Tensor& stats_in, const Tensor& x_in,
                                             const std::optional<Tensor>& y_in, const Tensor& x_labels_in,
                                             const Tensor& y_labels_in, int64_t self_offset, int64_t kind,
                                             int64_t pair_value, double a, double b, bool deterministic,
                                             bool need_dx, bool need_dy) {
  glue::check_kind(kind, "lse_rows_backward");
  glue::check_pair_value(pair_value, "lse_rows_backward");
  const glue::Rows rows = glue::prepare_rows(x_in, y_in, x_labels_in, y_labels_in);
  check_cpu(rows);
  glue::check_row_state(grad_in, stats_in, rows);
  const auto& [x, y, x_labels, y_labels, same] = rows;
  const ScalarType dtype = x.scalar_type();
  const Tensor grad = torch::stable::contiguous(torch::stable::to(grad_in, dtype));
  const Tensor stats = torch::stable::contiguous(torch::stable::to(stats_in, dtype));
  const glue::RowNorms norms = glue::row_norms(rows, dtype, glue::needs_norms(pair_value));
  if (same) need_dx = need_dx || need_dy, need_dy = false;
  Tensor dx = torch::stable::new_empty(x, {need_dx ? x.size(0) : 0, x.size(1)});
  Tensor dy = torch::stable::new_empty(y, {need_dy ? y.size(0) : 0, y.size(1)});
  if (x.size(1) > 0 && (need_dx || need_dy)) {
    with_rows_type(dtype, [&](auto zero) {
      using T = decltype(zero);
      PairRowsBackwardParams<T> params{make_params<T>(rows, norms, self_offset, kind, pair_value, a, b),
                                       grad.const_data_ptr<T>(), stats.const_data_ptr<T>(),
                                       need_dx ? dx.mutable_data_ptr<T>() : nullptr,
                                       need_dy ? dy.mutable_data_ptr<T>() : nullptr, false};
      if (same) params.dy = params.dx, params.accumulate_dy = true;
      cpu::lse_rows_backward(params);
    });
  } else {
    torch::stable::zero_(dx), torch::stable::zero_(dy);
  }
  return {dx, dy};
}

Tensor batch_hard_select(const Tensor& x_in, const Tensor& y_in, const Tensor& x_labels_in, const Tensor& y_labels_in,
                         int64_t self_offset) {
  const glue::Rows rows = glue::prepare_rows(x_in, y_in, x_labels_in, y_labels_in);
  check_cpu(rows);
  Tensor choices = torch::stable::new_empty(rows.x_labels, {2, rows.x.size(0)});
  const glue::RowNorms norms = glue::row_norms(rows, rows.x.scalar_type());
  with_rows_type(rows.x.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    cpu::batch_hard_select(make_params<T>(rows, norms, self_offset, 0, 0, 0, 0), choices.mutable_data_ptr<int64_t>());
  });
  return choices;
}

// One int64 entry per row of `count`, on the CPU, contiguous.
Tensor index_vector(const Tensor& t, int64_t count, const char* name, const char* op) {
  STD_TORCH_CHECK(t.is_cpu() && t.scalar_type() == ScalarType::Long && t.dim() == 1 && t.size(0) == count, op, ": ",
                  name, " must be a CPU int64 vector of ", count, " entries");
  return torch::stable::contiguous(t);
}

// How many references carry each label, once rank is checked to be _pairs.positive_slots' rank (reference j's index
// among the references with its label): the kernels index the tables with it, so a wrong one would write out of
// bounds. O(N + M) on the host.
std::unordered_map<int64_t, int64_t> reference_counts(const glue::Rows& rows, const Tensor& rank, const char* op) {
  const int64_t* label = rows.y_labels.const_data_ptr<int64_t>();
  const int64_t* index = rank.const_data_ptr<int64_t>();
  std::unordered_map<int64_t, int64_t> counts;
  for (int64_t j = 0; j < rows.y_labels.numel(); ++j)
    STD_TORCH_CHECK(index[j] == counts[label[j]]++, op, ": rank must be positive_slots(x_labels, y_labels)[1] ",
                    "(reference j's index among the references with its label), got ", index[j], " at ", j);
  return counts;
}

// The most references any query's label has: the positive table's least width.
int64_t slot_width(const glue::Rows& rows, const std::unordered_map<int64_t, int64_t>& counts) {
  const int64_t* label = rows.x_labels.const_data_ptr<int64_t>();
  int64_t width = 0;
  for (int64_t i = 0; i < rows.x_labels.numel(); ++i) {
    const auto found = counts.find(label[i]);
    width = std::max(width, found == counts.end() ? int64_t(0) : found->second);
  }
  return width;
}

template <typename T>
TripletMarginParams<T> triplet_params(const glue::Rows& rows, const glue::RowNorms& norms, int64_t self_offset,
                                      int64_t pair_value, double margin, bool smooth, const Tensor& rank,
                                      int64_t width) {
  return TripletMarginParams<T>{make_params<T>(rows, norms, self_offset, 0, pair_value, margin, 0),
                                rank.const_data_ptr<int64_t>(), width, smooth};
}

// (stats [2, N], table [N, K], weights [N, K]) with K = max(slots). The CPU kernels are deterministic: `deterministic`
// is accepted for a uniform signature.
std::tuple<Tensor, Tensor, Tensor> triplet_margin_rows(const Tensor& x_in, const std::optional<Tensor>& y_in,
                                                       const Tensor& x_labels_in, const Tensor& y_labels_in,
                                                       int64_t self_offset, int64_t pair_value, double margin,
                                                       bool smooth, const Tensor& slots_in, const Tensor& rank_in,
                                                       bool deterministic) {
  constexpr const char* kOp = "triplet_margin_rows";
  glue::check_pair_value(pair_value, kOp);
  const glue::Rows rows = glue::prepare_rows(x_in, y_in, x_labels_in, y_labels_in);
  check_cpu(rows);
  const Tensor& x = rows.x;
  const Tensor slots = index_vector(slots_in, x.size(0), "slots", kOp);
  const Tensor rank = index_vector(rank_in, rows.y.size(0), "rank", kOp);
  const std::unordered_map<int64_t, int64_t> counts = reference_counts(rows, rank, kOp);
  const int64_t* slot = slots.const_data_ptr<int64_t>();
  const int64_t* label = rows.x_labels.const_data_ptr<int64_t>();
  int64_t width = 0;
  for (int64_t i = 0; i < x.size(0); ++i) {
    const auto found = counts.find(label[i]);
    STD_TORCH_CHECK(slot[i] == (found == counts.end() ? 0 : found->second), kOp,
                    ": slots must be positive_slots(x_labels, y_labels)[0] (how many references have query i's ",
                    "label), got ", slot[i], " at ", i);
    width = std::max(width, slot[i]);
  }
  const glue::RowNorms norms = glue::row_norms(rows, x.scalar_type(), glue::needs_norms(pair_value));
  Tensor stats = torch::stable::new_empty(x, {2, x.size(0)});
  Tensor table = torch::stable::new_empty(x, {x.size(0), width});
  Tensor weights = torch::stable::new_empty(x, {x.size(0), width});
  with_rows_type(x.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    cpu::triplet_margin_forward(triplet_params<T>(rows, norms, self_offset, pair_value, margin, smooth, rank, width),
                                stats.mutable_data_ptr<T>(), table.mutable_data_ptr<T>(),
                                weights.mutable_data_ptr<T>());
  });
  return {stats, table, weights};
}

// (dX, dY) of sum_a grad[a] stats[0, a]; an unneeded gradient comes back with 0 rows. Without y (the references are
// the queries) dX holds the whole gradient. Always deterministic on the CPU.
std::tuple<Tensor, Tensor> triplet_margin_rows_backward(const Tensor& grad_in, const Tensor& table_in,
                                                        const Tensor& weights_in, const Tensor& x_in,
                                                        const std::optional<Tensor>& y_in, const Tensor& x_labels_in,
                                                        const Tensor& y_labels_in, int64_t self_offset,
                                                        int64_t pair_value, bool smooth, const Tensor& rank_in,
                                                        bool deterministic, bool need_dx, bool need_dy) {
  constexpr const char* kOp = "triplet_margin_rows_backward";
  glue::check_pair_value(pair_value, kOp);
  const glue::Rows rows = glue::prepare_rows(x_in, y_in, x_labels_in, y_labels_in);
  check_cpu(rows);
  const auto& [x, y, x_labels, y_labels, same] = rows;
  const int64_t n = x.size(0);
  STD_TORCH_CHECK(grad_in.is_cpu() && grad_in.dim() == 1 && grad_in.size(0) == n, kOp,
                  ": grad must be a CPU vector of N = ", n, " entries");
  STD_TORCH_CHECK(table_in.is_cpu() && weights_in.is_cpu() && table_in.dim() == 2 && table_in.size(0) == n &&
                      weights_in.dim() == 2 && weights_in.size(0) == n && weights_in.size(1) == table_in.size(1),
                  kOp, ": table and weights must be the forward's, N x K on the CPU (N = ", n, ")");
  const int64_t width = table_in.size(1);
  const Tensor rank = index_vector(rank_in, y.size(0), "rank", kOp);
  const int64_t needed = slot_width(rows, reference_counts(rows, rank, kOp));
  STD_TORCH_CHECK(needed <= width, kOp, ": table and weights must be K >= max(slots) = ", needed,
                  " wide, got ", width);
  const ScalarType dtype = x.scalar_type();
  const Tensor grad = torch::stable::contiguous(torch::stable::to(grad_in, dtype));
  const Tensor table = torch::stable::contiguous(torch::stable::to(table_in, dtype));
  const Tensor weights = torch::stable::contiguous(torch::stable::to(weights_in, dtype));
  const glue::RowNorms norms = glue::row_norms(rows, dtype, glue::needs_norms(pair_value));
  if (same) need_dx = need_dx || need_dy, need_dy = false;
  Tensor dx = torch::stable::new_empty(x, {need_dx ? n : 0, x.size(1)});
  Tensor dy = torch::stable::new_empty(y, {need_dy ? y.size(0) : 0, y.size(1)});
  if (x.size(1) > 0 && (need_dx || need_dy)) {
    with_rows_type(dtype, [&](auto zero) {
      using T = decltype(zero);
      const TripletMarginParams<T> triplet =
          triplet_params<T>(rows, norms, self_offset, pair_value, 0.0, smooth, rank, width);
      TripletMarginBackwardParams<T> params{
          PairRowsBackwardParams<T>{triplet.pair, grad.const_data_ptr<T>(), nullptr,
                                    need_dx ? dx.mutable_data_ptr<T>() : nullptr,
                                    need_dy ? dy.mutable_data_ptr<T>() : nullptr, false},
          triplet.rank, width, smooth, table.const_data_ptr<T>(), weights.const_data_ptr<T>()};
      if (same) params.rows.dy = params.rows.dx, params.rows.accumulate_dy = true;
      cpu::triplet_margin_backward(params);
    });
  } else {
    torch::stable::zero_(dx), torch::stable::zero_(dy);
  }
  return {dx, dy};
}

template <typename T>
MarginSoftmaxParams<T> classifier_params(const glue::ClassifierRows& rows, int64_t sub_centers, double scale,
                                         bool normalize_x, bool normalize_w, double pool_scale) {
  return MarginSoftmaxParams<T>{rows.x.const_data_ptr<T>(),
                                rows.weight.const_data_ptr<T>(),
                                rows.labels.const_data_ptr<int64_t>(),
                                rows.x.size(0),
                                rows.x.size(1),
                                rows.classes,
                                sub_centers,
                                rows.x.stride(0),
                                rows.weight.stride(0),
                                static_cast<T>(scale),
                                normalize_x,
                                normalize_w,
                                static_cast<T>(pool_scale),
                                &shim_gemm<T>,
                                static_cast<int>(torch::stable::get_num_threads())};
}

glue::ClassifierRows classifier_rows_on_cpu(const Tensor& x, const Tensor& weight, const Tensor& labels,
                                            int64_t sub_centers) {
  glue::ClassifierRows rows = glue::prepare_classifier_rows(x, weight, labels, sub_centers);
  STD_TORCH_CHECK(rows.x.is_cpu() && rows.weight.is_cpu() && rows.labels.is_cpu(),
                  "metric_kernels cpu ops take CPU tensors");
  STD_TORCH_CHECK(rows.x.scalar_type() == ScalarType::Float || rows.x.scalar_type() == ScalarType::Double,
                  "metric_kernels cpu ops compute in float32 or float64");
  const int64_t* label = rows.labels.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.labels.numel(); ++i)
    STD_TORCH_CHECK(label[i] >= 0 && label[i] < rows.classes, "labels must lie in [0, ", rows.classes, "), got ",
                    label[i]);
  return rows;
}

// stats [2, N]: the log-sum-exp of scale * cosine over the other classes, and the label's cosine.
Tensor margin_softmax_rows(const Tensor& x, const Tensor& weight, const Tensor& labels, int64_t sub_centers,
                           double scale, bool normalize_x, bool normalize_w, double pool_scale,
                           bool deterministic) {
  const glue::ClassifierRows rows = classifier_rows_on_cpu(x, weight, labels, sub_centers);
  Tensor stats = torch::stable::new_empty(rows.x, {2, rows.x.size(0)});
  with_rows_type(rows.x.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    cpu::margin_softmax_forward(classifier_params<T>(rows, sub_centers, scale, normalize_x, normalize_w, pool_scale),
                                stats.mutable_data_ptr<T>());
  });
  return stats;
}

// (dX, dW); an unneeded gradient comes back with 0 rows. Always deterministic on the CPU.
std::tuple<Tensor, Tensor> margin_softmax_rows_backward(const Tensor& grad_in, const Tensor& stats_in,
                                                        const Tensor& x, const Tensor& weight, const Tensor& labels,
                                                        int64_t sub_centers, double scale, bool normalize_x,
                                                        bool normalize_w, double pool_scale, bool deterministic,
                                                        bool need_dx, bool need_dw) {
  const glue::ClassifierRows rows = classifier_rows_on_cpu(x, weight, labels, sub_centers);
  const int64_t n = rows.x.size(0);
  STD_TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == 2 && grad_in.size(1) == n && stats_in.dim() == 2 &&
                      stats_in.size(0) == 2 && stats_in.size(1) == n,
                  "grad and stats must be 2 x N");
  const ScalarType dtype = rows.x.scalar_type();
  const Tensor grad = torch::stable::contiguous(torch::stable::to(grad_in, dtype));
  const Tensor stats = torch::stable::contiguous(torch::stable::to(stats_in, dtype));
  Tensor dx = torch::stable::new_empty(rows.x, {need_dx ? n : 0, rows.x.size(1)});
  Tensor dw = torch::stable::new_empty(rows.weight, {need_dw ? rows.weight.size(0) : 0, rows.weight.size(1)});
  with_rows_type(dtype, [&](auto zero) {
    using T = decltype(zero);
    cpu::margin_softmax_backward(MarginSoftmaxBackwardParams<T>{
        classifier_params<T>(rows, sub_centers, scale, normalize_x, normalize_w, pool_scale), grad.const_data_ptr<T>(),
        stats.const_data_ptr<T>(), need_dx ? dx.mutable_data_ptr<T>() : nullptr,
        need_dw ? dw.mutable_data_ptr<T>() : nullptr});
  });
  return {dx, dw};
}

}  // namespace
}  // namespace metric_kernels

// A fragment: the CUDA kernels' ops (cuda/ops.cpp) and the Triton ops (defined from Python) share the namespace.
STABLE_TORCH_LIBRARY_FRAGMENT(metric_kernels, m) {
  metric_kernels::glue::define_fused_ops(m, "cpu");
  metric_kernels::glue::define_margin_softmax_ops(m, "cpu");
  metric_kernels::glue::define_triplet_margin_ops(m, "cpu");
}

STABLE_TORCH_LIBRARY_IMPL(metric_kernels, CPU, m) {
  m.impl("cpu_lse_rows", TORCH_BOX(&metric_kernels::lse_rows));
  m.impl("cpu_lse_rows_backward", TORCH_BOX(&metric_kernels::lse_rows_backward));
  m.impl("cpu_batch_hard_select", TORCH_BOX(&metric_kernels::batch_hard_select));
  m.impl("cpu_margin_softmax_rows", TORCH_BOX(&metric_kernels::margin_softmax_rows));
  m.impl("cpu_margin_softmax_rows_backward", TORCH_BOX(&metric_kernels::margin_softmax_rows_backward));
  m.impl("cpu_triplet_margin_rows", TORCH_BOX(&metric_kernels::triplet_margin_rows));
  m.impl("cpu_triplet_margin_rows_backward", TORCH_BOX(&metric_kernels::triplet_margin_rows_backward));
}
