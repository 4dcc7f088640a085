// What the torch glue of every native backend shares (bindings.cpp for the CPU kernels, cuda/ops.cpp for the CUDA
// ones): the ops' schemas and the preparation and checks of their tensor arguments. The ops' contract, with their
// fake implementations and autograd formula, is metric_kernels/_fused.py.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "epilogue.h"

namespace metric_kernels::glue {

// The rows as the kernels read them (unit column stride, any row stride) and contiguous labels. Without y the
// references are the queries (`same`): y is then x itself.
struct Rows {
  at::Tensor x, y, x_labels, y_labels;
  bool same;
};

inline at::Tensor rows_contiguous(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

// Checks the shapes and label dtypes every backend needs; each backend then checks its own devices and dtypes.
inline Rows prepare_rows(const at::Tensor& x, const std::optional<at::Tensor>& y, const at::Tensor& x_labels,
                         const at::Tensor& y_labels) {
  const bool same = !y.has_value();
  TORCH_CHECK(x.dim() == 2 && (same || (y->dim() == 2 && x.size(1) == y->size(1))),
              "x and y must be N x D and M x D");
  TORCH_CHECK(same || x.scalar_type() == y->scalar_type(), "x and y must have one dtype");
  TORCH_CHECK(x_labels.scalar_type() == at::kLong && y_labels.scalar_type() == at::kLong, "labels must be int64");
  Rows rows{rows_contiguous(x), same ? at::Tensor() : rows_contiguous(*y), x_labels.contiguous(),
            y_labels.contiguous(), same};
  if (same) rows.y = rows.x;
  TORCH_CHECK(rows.x_labels.numel() == rows.x.size(0) && rows.y_labels.numel() == rows.y.size(0),
              "one label per row");
  return rows;
}

// The backward's row state: upstream gradients and forward statistics, kStatRows x N each, beside the rows.
inline void check_row_state(const at::Tensor& grad, const at::Tensor& stats, const Rows& rows) {
  const int64_t n = rows.x.size(0);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == kStatRows && grad.size(1) == n, "grad must be ", kStatRows,
              " x N = ", kStatRows, " x ", n, ", got ", grad.sizes());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == kStatRows && stats.size(1) == n, "stats must be ", kStatRows,
              " x N = ", kStatRows, " x ", n, ", got ", stats.sizes());
  TORCH_CHECK(grad.device() == rows.x.device() && stats.device() == rows.x.device(),
              "grad and stats must be on the rows' device");
}

// What a pair contributes (metric_kernels/_pairs.py, epilogue.h's PairValue): 0 the dot product of the rows as given,
// 1 minus their squared Euclidean distance, 2 minus their Euclidean distance.
// The loss (epilogue.h's LossKind): Circle, SupCon, Proxy-Anchor, Multi-Similarity, NT-Xent, Contrastive.
inline void check_kind(int64_t kind, const char* op) {
  TORCH_CHECK(kind >= 0 && kind <= 5, op, ": kind ", kind, " is not a loss of the engine (0 Circle, 1 SupCon, ",
              "2 Proxy-Anchor, 3 Multi-Similarity, 4 NT-Xent, 5 Contrastive)");
}

inline void check_pair_value(int64_t pair_value, const char* op) {
  TORCH_CHECK(pair_value >= 0 && pair_value <= 2, op, ": pair_value must be 0 (the dot product), 1 (minus the squared ",
              "Euclidean distance) or 2 (minus the Euclidean distance), got ", pair_value);
}

// The rows' squared norms in `dtype`, which the distances (pair_value 1, 2) and batch-hard's selection form
// q = |x|^2 + |y|^2 - 2 x . y from: O((N + M) D), once per call; y's are x's when the references are the queries.
// Undefined tensors when not `needed`.
struct RowNorms {
  at::Tensor x_sq, y_sq;
};

inline RowNorms row_norms(const Rows& rows, at::ScalarType dtype, bool needed = true) {
  if (!needed) return {};
  const at::Tensor x_sq = rows.x.to(dtype).pow(2).sum(1);
  return {x_sq, rows.same ? x_sq : rows.y.to(dtype).pow(2).sum(1)};
}

inline bool needs_norms(int64_t pair_value) { return pair_value != 0; }

// The three ops of a fused backend, metric_kernels::<prefix>_lse_rows, _lse_rows_backward, _batch_hard_select.
inline void define_fused_ops(torch::Library& library, const std::string& prefix) {
  const auto def = [&](const std::string& schema) { library.def(schema.c_str()); };
  def(prefix + "_lse_rows(Tensor x, Tensor? y, Tensor x_labels, Tensor y_labels, int self_offset, int kind, "
               "int pair_value, float param_a, float param_b, bool deterministic) -> Tensor");
  def(prefix + "_lse_rows_backward(Tensor grad, Tensor stats, Tensor x, Tensor? y, Tensor x_labels, "
               "Tensor y_labels, int self_offset, int kind, int pair_value, float param_a, float param_b, "
               "bool deterministic, bool need_dx, bool need_dy) -> (Tensor, Tensor)");
  def(prefix + "_batch_hard_select(Tensor x, Tensor y, Tensor x_labels, Tensor y_labels, int self_offset) -> Tensor");
}

}  // namespace metric_kernels::glue
