// What the torch glue of every native backend shares (bindings.cpp for the CPU kernels, cuda/ops.cpp for the CUDA
// ones): the ops' schemas and the preparation and checks of their tensor arguments. The ops' contract, with their
// fake implementations and autograd formula, is metric_kernels/_fused.py.
//
// The glue uses torch's stable ABI only (torch/csrc/stable, torch/headeronly and the C shim; CMakeLists.txt sets
// TORCH_TARGET_VERSION, under which torch's other headers refuse to compile), so one build loads in every torch from
// that version on.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <array>
#include <optional>
#include <string>

#include "epilogue.h"

// torch 2.10 and 2.11 name the shim's error check TORCH_ERROR_CODE_CHECK; 2.12 added this name (and later versions
// may retire the old one).
#ifndef STABLE_TORCH_ERROR_CODE_CHECK
#define STABLE_TORCH_ERROR_CODE_CHECK(call) TORCH_ERROR_CODE_CHECK(call)
#endif

namespace metric_kernels::glue {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// The rows as the kernels read them (unit column stride, any row stride) and contiguous labels. Without y the
// references are the queries (`same`): y is then x itself.
struct Rows {
  Tensor x, y, x_labels, y_labels;
  bool same;
};

inline Tensor rows_contiguous(const Tensor& t) { return t.stride(1) == 1 ? t : torch::stable::contiguous(t); }

// Checks the shapes and label dtypes every backend needs; each backend then checks its own devices and dtypes.
inline Rows prepare_rows(const Tensor& x, const std::optional<Tensor>& y, const Tensor& x_labels,
                         const Tensor& y_labels) {
  const bool same = !y.has_value();
  STD_TORCH_CHECK(x.dim() == 2 && (same || (y->dim() == 2 && x.size(1) == y->size(1))),
                  "x and y must be N x D and M x D");
  STD_TORCH_CHECK(same || x.scalar_type() == y->scalar_type(), "x and y must have one dtype");
  STD_TORCH_CHECK(x_labels.scalar_type() == ScalarType::Long && y_labels.scalar_type() == ScalarType::Long,
                  "labels must be int64");
  const Tensor x_rows = rows_contiguous(x);
  Rows rows{x_rows, same ? x_rows : rows_contiguous(*y), torch::stable::contiguous(x_labels),
            torch::stable::contiguous(y_labels), same};
  STD_TORCH_CHECK(rows.x_labels.numel() == rows.x.size(0) && rows.y_labels.numel() == rows.y.size(0),
                  "one label per row");
  return rows;
}

// The backward's row state: upstream gradients and forward statistics, kStatRows x N each, beside the rows.
inline void check_row_state(const Tensor& grad, const Tensor& stats, const Rows& rows) {
  const int64_t n = rows.x.size(0);
  const auto shape = [](const Tensor& t) {
    std::string text = "[";
    for (int64_t dim = 0; dim < t.dim(); ++dim) text += (dim ? ", " : "") + std::to_string(t.size(dim));
    return text + "]";
  };
  STD_TORCH_CHECK(grad.dim() == 2 && grad.size(0) == kStatRows && grad.size(1) == n, "grad must be ", kStatRows,
                  " x N = ", kStatRows, " x ", n, ", got ", shape(grad));
  STD_TORCH_CHECK(stats.dim() == 2 && stats.size(0) == kStatRows && stats.size(1) == n, "stats must be ", kStatRows,
                  " x N = ", kStatRows, " x ", n, ", got ", shape(stats));
  STD_TORCH_CHECK(grad.device() == rows.x.device() && stats.device() == rows.x.device(),
                  "grad and stats must be on the rows' device");
}

// What a pair contributes (metric_kernels/_pairs.py, epilogue.h's PairValue): 0 the dot product of the rows as given,
// 1 minus their squared Euclidean distance, 2 minus their Euclidean distance.
// The loss (epilogue.h's LossKind): Circle, SupCon, Proxy-Anchor, Multi-Similarity, NT-Xent, Contrastive.
inline void check_kind(int64_t kind, const char* op) {
  STD_TORCH_CHECK(kind >= 0 && kind <= 5, op, ": kind ", kind, " is not a loss of the engine (0 Circle, 1 SupCon, ",
                  "2 Proxy-Anchor, 3 Multi-Similarity, 4 NT-Xent, 5 Contrastive)");
}

inline void check_pair_value(int64_t pair_value, const char* op) {
  STD_TORCH_CHECK(pair_value >= 0 && pair_value <= 2, op, ": pair_value must be 0 (the dot product), 1 (minus the ",
                  "squared Euclidean distance) or 2 (minus the Euclidean distance), got ", pair_value);
}

// a * b elementwise (aten::mul.Tensor): the stable API wraps no multiplication, so through torch's dispatcher, the
// stable way to reach an op it does not wrap.
inline Tensor multiply(const Tensor& a, const Tensor& b) {
  std::array<StableIValue, 2> stack{torch::stable::detail::from(a), torch::stable::detail::from(b)};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher("aten::mul", "Tensor", stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}

// The rows' squared norms in `dtype`, which the distances (pair_value 1, 2) and batch-hard's selection form
// q = |x|^2 + |y|^2 - 2 x . y from: O((N + M) D), once per call; y's are x's when the references are the queries.
// None when not `needed`.
struct RowNorms {
  std::optional<Tensor> x_sq, y_sq;
};

inline RowNorms row_norms(const Rows& rows, ScalarType dtype, bool needed = true) {
  if (!needed) return {};
  const auto squared_norms = [dtype](const Tensor& t) {
    const Tensor values = torch::stable::to(t, dtype);
    const std::array<int64_t, 1> row_dim{1};
    return torch::stable::sum(multiply(values, values), torch::headeronly::IntHeaderOnlyArrayRef(row_dim));
  };
  const Tensor x_sq = squared_norms(rows.x);
  return {x_sq, rows.same ? x_sq : squared_norms(rows.y)};
}

inline bool needs_norms(int64_t pair_value) { return pair_value != 0; }

// The three ops of a fused backend, metric_kernels::<prefix>_lse_rows, _lse_rows_backward, _batch_hard_select;
// `backend_arguments` (", bool allow_tf32=False" for the CUDA kernels' ops) end each op's arguments.
inline void define_fused_ops(torch::stable::detail::StableLibrary& library, const std::string& prefix,
                             const std::string& backend_arguments = "") {
  const auto def = [&](const std::string& name, const std::string& arguments, const std::string& returns) {
    library.def((prefix + name + "(" + arguments + backend_arguments + ") -> " + returns).c_str());
  };
  def("_lse_rows", "Tensor x, Tensor? y, Tensor x_labels, Tensor y_labels, int self_offset, int kind, "
                   "int pair_value, float param_a, float param_b, bool deterministic", "Tensor");
  def("_lse_rows_backward", "Tensor grad, Tensor stats, Tensor x, Tensor? y, Tensor x_labels, Tensor y_labels, "
                            "int self_offset, int kind, int pair_value, float param_a, float param_b, "
                            "bool deterministic, bool need_dx, bool need_dy", "(Tensor, Tensor)");
  def("_batch_hard_select", "Tensor x, Tensor y, Tensor x_labels, Tensor y_labels, int self_offset", "Tensor");
}

// The margin-softmax classifiers' two ops, metric_kernels::<prefix>_margin_softmax_rows and its _backward
// (metric_kernels/_fused.py): stats [2, N] from the raw rows x (N x D) and class matrix weight (D x C * sub_centers).
inline void define_margin_softmax_ops(torch::stable::detail::StableLibrary& library, const std::string& prefix,
                                      const std::string& backend_arguments = "") {
  library.def((prefix + "_margin_softmax_rows(Tensor x, Tensor weight, Tensor labels, int sub_centers, float scale, "
               "bool normalize_x, bool normalize_w, float pool_scale, bool deterministic" + backend_arguments +
               ") -> Tensor").c_str());
  library.def((prefix + "_margin_softmax_rows_backward(Tensor grad, Tensor stats, Tensor x, Tensor weight, "
               "Tensor labels, int sub_centers, float scale, bool normalize_x, bool normalize_w, float pool_scale, "
               "bool deterministic, bool need_dx, bool need_dw" + backend_arguments + ") -> (Tensor, Tensor)").c_str());
}

// The triplet margin loss's two ops, metric_kernels::<prefix>_triplet_margin_rows and its _backward
// (metric_kernels/_fused.py): (stats [2, N], table [N, K], weights [N, K]) and (dx, dy).
inline void define_triplet_margin_ops(torch::stable::detail::StableLibrary& library, const std::string& prefix,
                                      const std::string& backend_arguments = "") {
  library.def((prefix + "_triplet_margin_rows(Tensor x, Tensor? y, Tensor x_labels, Tensor y_labels, "
               "int self_offset, int pair_value, float margin, bool smooth, Tensor slots, Tensor rank, "
               "bool deterministic" + backend_arguments + ") -> (Tensor, Tensor, Tensor)").c_str());
  library.def((prefix + "_triplet_margin_rows_backward(Tensor grad, Tensor table, Tensor weights, Tensor x, "
               "Tensor? y, Tensor x_labels, Tensor y_labels, int self_offset, int pair_value, bool smooth, "
               "Tensor rank, bool deterministic, bool need_dx, bool need_dy" + backend_arguments +
               ") -> (Tensor, Tensor)").c_str());
}

// The margin-softmax ops' tensors, checked: x N x D and weight D x J with unit column strides (a copy only where
// the caller's have none), J = classes * sub_centers, one int64 label per row, each in [0, classes) (read on the
// host: the CPU ops' labels live there).
struct ClassifierRows {
  Tensor x, weight, labels;
  int64_t classes;
};

inline ClassifierRows prepare_classifier_rows(const Tensor& x, const Tensor& weight, const Tensor& labels,
                                              int64_t sub_centers) {
  STD_TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(0),
                  "x must be N x D and weight D x J");
  STD_TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight must have one dtype");
  STD_TORCH_CHECK(sub_centers >= 1 && weight.size(1) % sub_centers == 0,
                  "weight's columns must be a whole number of classes of sub_centers columns each");
  STD_TORCH_CHECK(labels.scalar_type() == ScalarType::Long && labels.dim() == 1 && labels.size(0) == x.size(0),
                  "labels must be int64, one per row");
  return {rows_contiguous(x), rows_contiguous(weight), torch::stable::contiguous(labels),
          weight.size(1) / sub_centers};
}

}  // namespace metric_kernels::glue
