// What a fused kernel gets: raw pointers, sizes and strides, apart from any torch type (FlashAttention's pattern), so
// the same kernels serve the torch bindings, a plain C++ test or another framework.
#pragma once

#include <cstdint>

namespace metric_kernels {

// C[m x n] = beta * C + op(A) op(B), row-major with leading dimensions; op transposes when asked.
// The CPU kernels call it on tiles; the bindings supply a BLAS-backed implementation.
template <typename T>
using GemmFn = void (*)(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, const T* a,
                        int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc);

template <typename T>
struct PairRowsParams {
  const T* x;               // N x D queries, row stride x_stride, contiguous rows
  const T* y;               // M x D references (may equal x)
  const int64_t* x_labels;  // N
  const int64_t* y_labels;  // M
  int64_t n, m, d, x_stride, y_stride;
  int64_t self_offset;      // query i is reference i + self_offset; < 0: none
  int kind;                 // LossKind
  T a, b;                   // loss parameters (epilogue.h)
  GemmFn<T> gemm;
  int num_threads;          // CPU kernels: OpenMP threads (the bindings pass torch.get_num_threads())
  int pair_value = 0;       // PairValue (epilogue.h): what a pair contributes to the log-sum-exp losses
  const T* x_sq = nullptr;  // N squared row norms of x: the distances (pair_value 1, 2) and batch-hard need them
  const T* y_sq = nullptr;  // M squared row norms of y (equal to x_sq when y is x)
};

template <typename T>
struct PairRowsBackwardParams {
  PairRowsParams<T> pair;
  const T* grad;   // 3 x N upstream gradients of the statistics
  const T* stats;  // 3 x N saved statistics
  T* dx;           // N x D (contiguous) or nullptr
  T* dy;           // M x D (contiguous) or nullptr; equal to dx when the references are the queries
  bool accumulate_dy;  // add dY into what dy holds (the dX of the same rows)
};

// The triplet margin loss over every triplet (metric_kernels/_fused.py), with pair.a the margin: per anchor (query) a
// table of its positives, table[a, rank[p]] = margin - v_ap, K = slot_count wide (-inf in the slots no positive
// fills), which every negative n of the anchor meets in z = v_an + table[a, r].
template <typename T>
struct TripletMarginParams {
  PairRowsParams<T> pair;  // kind and b unused
  const int64_t* rank;     // M: reference j's index among the references with its label (_pairs.positive_slots)
  int64_t slot_count;      // K: at least the number of references with any query's label
  bool smooth;             // softplus of the violation (torch's, linear above 20) instead of relu
};

template <typename T>
struct TripletMarginBackwardParams {
  PairRowsBackwardParams<T> rows;  // grad: N upstream gradients of stats[0] (the counts have none); stats unused
  const int64_t* rank;
  int64_t slot_count;
  bool smooth;
  const T* table;    // N x K, as the forward wrote it
  const T* weights;  // N x K: weights[a, r] = sum over the anchor's negatives n of f'(v_an + table[a, r])
};

// The margin-softmax classifiers (ArcFace, CosFace, SubCenterArcFace, NormalizedSoftmax, LargeMarginSoftmax,
// SphereFace, SoftTriple): queries against the columns of a class matrix W kept as PML keeps it, D x J with
// J = classes * sub_centers (column j: class j / sub_centers). Rows and columns are read raw and normalised on the fly
// with O(N + J) inverse norms (or left raw): W is never copied.
template <typename T>
struct MarginSoftmaxParams {
  const T* x;             // N x D, unit column stride, row stride x_stride
  const T* w;             // D x J, unit column stride, row stride w_stride (>= J)
  const int64_t* labels;  // N, each in [0, classes)
  int64_t n, d, classes, sub_centers, x_stride, w_stride;
  T scale;                // the logits are scale * cosine
  // Which side is normalised: false leaves the rows (W's columns) raw, so that the "cosine" of a pair is
  // x . w / |w| (SphereFace: rows raw) or x . w (LargeMarginSoftmax: both raw); the inverse norm is then 1 and the
  // normalisation's radial term is absent.
  bool normalize_x, normalize_w;
  // How a class's sub-centres pool into its cosine: 0 the largest (SubCenterArcFace), > 0 their mean weighted by
  // softmax(pool_scale * cos) (SoftTriple).
  T pool_scale;
  GemmFn<T> gemm;
  int num_threads;
};

// stats (2 x N): 0 the log-sum-exp of scale * cosine over the classes other than the row's label, 1 the cosine of
// the label's class; a class's cosine is the largest of its sub-centres'.
template <typename T>
struct MarginSoftmaxBackwardParams {
  MarginSoftmaxParams<T> rows;
  const T* grad;   // 2 x N upstream gradients of the statistics
  const T* stats;  // 2 x N saved statistics
  T* dx;           // N x D contiguous, or nullptr
  T* dw;           // D x J contiguous, or nullptr
};

// The CUDA kernels' view of the same problem. Operands are stored as the inputs are (fp32, fp16, bf16 or fp64);
// `operand` also says how fp32 tiles are multiplied (tf32 tensor cores where torch allows it, IEEE FMA otherwise).
// Statistics, upstream gradients and the dX/dY buffers are float64 for fp64 operands and float32 for all others.
enum class Operand : int { kFloat32 = 0, kTf32 = 1, kFloat16 = 2, kBFloat16 = 3, kFloat64 = 4 };

struct CudaPairRowsParams {
  const void* x;            // N x D, unit column stride, row stride x_stride (elements)
  const void* y;            // M x D (may equal x)
  const int64_t* x_labels;  // N
  const int64_t* y_labels;  // M
  int64_t n, m, d, x_stride, y_stride;
  int64_t self_offset;      // query i is reference i + self_offset; < 0: none
  int kind;                 // LossKind
  double a, b;              // loss parameters (epilogue.h), rounded to the statistics' type in the kernels
  Operand operand;
  int pair_value = 0;          // PairValue (epilogue.h): what a pair contributes to the log-sum-exp losses
  const void* x_sq = nullptr;  // N squared row norms of x in the accumulation type: distances, batch-hard, normalize
  const void* y_sq = nullptr;  // M squared row norms of y (equal to x_sq when y is x)
  bool normalize = false;      // the rows are raw: s_ij = (x_i . y_j) r_i r_j, r = 1 / max(|row|, eps) (engine.cuh)
};

// The triplet margin loss over every triplet on the CUDA kernels (TripletMarginParams' problem; kTripletMargin, with
// CudaPairRowsParams' a the margin): how the references fill an anchor's row of the positive table.
struct CudaTripletSlots {
  const int64_t* rank = nullptr;  // M: reference j's index among the references with its label (positive_slots)
  int64_t slot_count = 0;         // K: the table's width, at least the number of references with any query's label
  bool smooth = false;            // softplus of the violation (torch's, linear above 20) instead of relu
};

struct CudaPairRowsBackwardParams {
  CudaPairRowsParams pair;
  const void* grad;    // 3 x N upstream gradients of the statistics (kTripletMargin: N, those of stats[0])
  const void* stats;   // 3 x N saved statistics (kTripletMargin: unused, nullptr)
  void* dx;            // N x D contiguous accumulator, or nullptr
  void* dy;            // M x D contiguous accumulator, or nullptr; equal to dx when the references are the queries
  bool accumulate_dy;  // the dY pass adds into what dy holds (the dX of the same rows)
  bool atomic;         // dY is added atomically from the dX pass (dy zeroed by the caller), no dY pass
  // fp16 operands: 1 element of the accumulation type where lse_rows_backward first writes a power of two g by which
  // dS r_i r_j is multiplied before it becomes an fp16 operand (fp16's range would flush a large batch's small
  // softmax terms to zero); the gradients are divided by it again. nullptr: g = 1.
  void* gradient_scale = nullptr;
  // kTripletMargin: its slots, and the forward's N x slot_count table and weights (accumulation type), which its dS
  // reads in place of the statistics (epilogue.h's triplet_margin_dv).
  CudaTripletSlots triplet = {};
  const void* table = nullptr;
  const void* weights = nullptr;
};

// Batch-hard's chosen triplets on the CUDA kernels (triplet.cu): the rows as stored, their squared norms where
// normalising, and per query the indices of its chosen positive and negative (in [0, M); the kernels clamp others
// into it). Distances, coefficients and norms in the accumulation type; the gradients in the rows' type.
struct CudaTripletParams {
  const void* x;            // N x D, unit column stride, row stride x_stride (elements)
  const void* y;            // M x D (may equal x)
  const void* x_sq;         // N squared row norms of x where normalize, else nullptr
  const void* y_sq;         // M squared row norms of y (x_sq when y is x)
  const int64_t* positive;  // N
  const int64_t* negative;  // N
  int64_t n, m, d, x_stride, y_stride;
  Operand operand;          // the rows' type (kTf32 reads as fp32: no products on tensor cores here)
  bool normalize;           // u = x r, v = y r with r = 1 / max(|row|, eps) (engine.cuh), else r = 1
};

struct CudaTripletBackwardParams {
  CudaTripletParams rows;
  const void* coefficients;  // 2 x N: g / d for each chosen distance (0 where d is 0)
  const int64_t* order;      // the 2 N choices (positives then negatives) sorted stably by reference
  const int64_t* offsets;    // M + 1: reference j's choosers are order[offsets[j]] .. order[offsets[j + 1] - 1]
  void* dx;                  // N x D contiguous in the rows' type, or nullptr
  void* dy;                  // M x D contiguous in the rows' type, or nullptr
  bool same;                 // the references are the queries: one pass writes the whole gradient to dx
};

// The margin-softmax classifiers on the CUDA kernels (MarginSoftmaxParams' problem): operands as the inputs are
// stored, inverse norms (1 / max(|row|, eps), in the accumulation type) computed by the kernels into buffers the
// caller provides; statistics, upstream gradients and the dX / dW buffers in the accumulation type (float64 for fp64
// operands, else float32).
struct CudaMarginSoftmaxParams {
  const void* x;          // N x D, unit column stride, row stride x_stride (elements)
  const void* w;          // D x J, unit column stride, row stride w_stride (>= J)
  const int64_t* labels;  // N, each in [0, classes)
  void* x_inverse;        // N: written by the kernels
  void* w_inverse;        // J: written by the kernels
  int64_t n, d, classes, sub_centers, x_stride, w_stride;  // sub_centers <= 64 (a class within one 64-column tile)
  double scale;
  bool normalize_x, normalize_w;  // as MarginSoftmaxParams' (x_inverse / w_inverse then hold 1)
  double pool_scale;              // as MarginSoftmaxParams'
  Operand operand;
};

struct CudaMarginSoftmaxBackwardParams {
  CudaMarginSoftmaxParams rows;
  const void* grad;   // 2 x N upstream gradients of the statistics
  const void* stats;  // 2 x N saved statistics
  void* dx;           // N x D contiguous, or nullptr
  void* dw;           // D x J contiguous, or nullptr
  bool atomic;        // dW added from the dX pass through atomics (the caller zeroes it; both gradients wanted)
};

}  // namespace metric_kernels
