// The tiled engine shared by the CUDA kernels: one block of 128 threads owns a 64 x 64 tile of the similarity matrix
// S = X Y^T at a time, forms it in shared memory from 64 x 32 chunks of X and Y (tile_mma.cuh), and hands it to a
// loss epilogue (lse_rows.cu, batch_hard.cu). Nothing of size N x M exists outside the tile.
//
// The epilogues read the S tile two threads per row (thread t: row t / 2, columns t % 2, t % 2 + 2, ...), so per-row
// state lives in registers and the two halves of a row meet through one warp shuffle.
#pragma once

#include <cstdint>

#include "../epilogue.h"
#include "../params.h"
#include "tile_mma.cuh"

namespace metric_kernels::cuda {

constexpr int kChunk = 32;  // D columns per step of S = X Y^T
constexpr double kNormEps = 1e-12;  // F.normalize's eps: a row is divided by max(|row|, eps)

constexpr int64_t align128(int64_t bytes) { return (bytes + 127) / 128 * 128; }

// How many 64-wide tiles cover `size`.
inline int64_t blocks(int64_t size) { return (size + kTile - 1) / kTile; }

// How many 64-wide slices of D one backward block holds (lse_rows.cu, margin_softmax.cu), their accumulators in
// registers: the whole of D up to 256, so that each pass recomputes every product tile once (blocks along D only above
// that, each recomputing the tile). fp64's accumulators (64 registers a slice) allow one.
template <class Policy>
constexpr int kSlices = sizeof(typename Policy::Acc) == 8 ? 1 : 4;

// Columns of D per backward block, and how many such blocks cover D.
template <class Policy>
constexpr int64_t kSpan = int64_t{kTile} * kSlices<Policy>;

template <class Policy>
unsigned spans(int64_t d) {
  return static_cast<unsigned>((d + kSpan<Policy> - 1) / kSpan<Policy>);
}

// Dynamic shared memory of one block, in regions that each start 128-byte aligned. Rows are padded by 16 bytes,
// which keeps WMMA's leading dimensions legal and spreads rows over the banks.
template <class Policy>
struct SharedLayout {
  using Operand = typename Policy::Operand;
  using Acc = typename Policy::Acc;
  static constexpr int kChunkLd = kChunk + 16 / static_cast<int>(sizeof(Operand));
  static constexpr int kTileLd = kTile + 16 / static_cast<int>(sizeof(Operand));
  static constexpr int kAccLd = kTile + 16 / static_cast<int>(sizeof(Acc));
  static constexpr int kScaleRows = 3;      // RowScale's inverse, squared length and radial flag
  static constexpr int kRowStateRows = 9;   // upstream gradients g1..g3, statistics 0..2, the RowScale

  static constexpr int64_t kXChunk = 0;
  static constexpr int64_t kYChunk = kXChunk + align128(kTile * kChunkLd * sizeof(Operand));
  static constexpr int64_t kS = kYChunk + align128(kTile * kChunkLd * sizeof(Operand));
  static constexpr int64_t kRowLabels = kS + align128(kTile * kAccLd * sizeof(Acc));
  static constexpr int64_t kColLabels = kRowLabels + align128(kTile * sizeof(int64_t));
  static constexpr int64_t kColScales = kColLabels + align128(kTile * sizeof(int64_t));
  static constexpr int64_t kRowState = kColScales + align128(kScaleRows * kTile * sizeof(Acc));
  static constexpr int64_t kDs = kRowState + align128(kRowStateRows * kTile * sizeof(Acc));
  static constexpr int64_t kOut = kDs + align128(kTile * kTileLd * sizeof(Operand));
  static constexpr int64_t kSums = kOut + align128(kTile * kTileLd * sizeof(Operand));
  static constexpr int64_t kOutRows = kSums + align128(kTile * sizeof(Acc));
  static constexpr int64_t kEnd = kOutRows + align128(kTile * kTileLd * sizeof(Operand));

  // What each kernel uses: the forward and the selection stop before dS; only the atomic dX pass needs kOutRows.
  static constexpr int64_t kForwardBytes = kDs;
  static constexpr int64_t kBackwardBytes = kOutRows;
  static constexpr int64_t kAtomicBackwardBytes = kEnd;

  Operand* x_chunk;     // 64 x kChunk rows of X (padded to kChunkLd)
  Operand* y_chunk;     // 64 x kChunk rows of Y
  Acc* s;               // the 64 x 64 S tile (kAccLd); also where accumulators are staged for global writes
  int64_t* row_labels;  // labels of the tile's rows
  int64_t* col_labels;  // labels of the tile's columns
  Acc* col_scales;      // 3 x 64: the RowScale of the tile's columns (inverse, squared length, radial as 0 / 1)
  Acc* row_state;       // 9 x 64: upstream gradients g1, g2, g3, statistics 0..2 and the RowScale of the tile's rows
  Operand* ds;          // the 64 x 64 dS tile, as an MMA operand (kTileLd)
  Operand* out;         // 64 x 64 of Y (dX pass) or X (dY pass) at the output's D columns
  Acc* sums;            // 64 row or column sums of dS: the distances' norm terms (epilogue.h, has_norm_term)
  Operand* out_rows;    // atomic dX pass: 64 x 64 of X at the output's D columns, for dY = dS^T X

  __device__ explicit SharedLayout(unsigned char* base)
      : x_chunk(reinterpret_cast<Operand*>(base + kXChunk)),
        y_chunk(reinterpret_cast<Operand*>(base + kYChunk)),
        s(reinterpret_cast<Acc*>(base + kS)),
        row_labels(reinterpret_cast<int64_t*>(base + kRowLabels)),
        col_labels(reinterpret_cast<int64_t*>(base + kColLabels)),
        col_scales(reinterpret_cast<Acc*>(base + kColScales)),
        row_state(reinterpret_cast<Acc*>(base + kRowState)),
        ds(reinterpret_cast<Operand*>(base + kDs)),
        out(reinterpret_cast<Operand*>(base + kOut)),
        sums(reinterpret_cast<Acc*>(base + kSums)),
        out_rows(reinterpret_cast<Operand*>(base + kOutRows)) {}
};

// dst[64 x width] (leading dimension ld) = src[row0 :, col0 :] with zeros past rows_total / cols_total.
template <class T>
__device__ __forceinline__ void load_tile(T* dst, int ld, int width, const T* src, int64_t stride, int64_t row0,
                                          int64_t rows_total, int64_t col0, int64_t cols_total) {
  for (int index = threadIdx.x; index < kTile * width; index += kThreads) {
    const int r = index / width, c = index % width;
    const int64_t row = row0 + r, col = col0 + c;
    dst[r * ld + c] = (row < rows_total && col < cols_total) ? src[row * stride + col] : T(0.0f);
  }
}

__device__ __forceinline__ void load_labels(int64_t* dst, const int64_t* labels, int64_t start, int64_t total) {
  if (threadIdx.x < kTile) {
    const int64_t index = start + threadIdx.x;
    dst[threadIdx.x] = index < total ? labels[index] : 0;
  }
}

// dst[64 x width] (leading dimension ld) = the transpose of src[row0 :, col0 :], src's rows read along: element
// (j, k) is src[(row0 + k) * stride + col0 + j] (a D x J matrix read as J x D: the classifiers' W), zeros past
// rows_total (D) and cols_total (J). Consecutive threads read consecutive columns of src.
template <class T>
__device__ __forceinline__ void load_transposed_tile(T* dst, int ld, int width, const T* src, int64_t stride,
                                                     int64_t row0, int64_t rows_total, int64_t col0,
                                                     int64_t cols_total) {
  for (int index = threadIdx.x; index < kTile * width; index += kThreads) {
    const int j = index % kTile, k = index / kTile;
    const int64_t row = row0 + k, col = col0 + j;
    dst[j * ld + k] = (row < rows_total && col < cols_total) ? src[row * stride + col] : T(0.0f);
  }
}

// shared.s = A B^T of two 64-row operands accumulated over D in kChunk steps: load_chunks(d0) fills
// shared.x_chunk and shared.y_chunk with their columns d0 .. d0 + kChunk. Ends synchronised.
template <class Policy, class LoadChunks>
__device__ void product_tile(int64_t d, SharedLayout<Policy>& shared, LoadChunks&& load_chunks) {
  using Layout = SharedLayout<Policy>;
  typename Policy::Accumulator acc;
  Policy::zero(acc);
  for (int64_t d0 = 0; d0 < d; d0 += kChunk) {
    load_chunks(d0);
    __syncthreads();
    // B = Y^T: element (k, j) is Y[j][k], a column-major read of the Y chunk
    Policy::template mma<RowMajor, ColMajor>(acc, shared.x_chunk, Layout::kChunkLd, shared.y_chunk,
                                             Layout::kChunkLd, kChunk);
    __syncthreads();
  }
  Policy::store(acc, shared.s, Layout::kAccLd);
  __syncthreads();
}

// shared.s = X[r0 : r0 + 64] . Y[c0 : c0 + 64]^T. Ends synchronised.
template <class Policy>
__device__ void similarity_tile(const CudaPairRowsParams& p, int64_t r0, int64_t c0, SharedLayout<Policy>& shared) {
  using Layout = SharedLayout<Policy>;
  using Operand = typename Policy::Operand;
  const auto* x = static_cast<const Operand*>(p.x);
  const auto* y = static_cast<const Operand*>(p.y);
  product_tile<Policy>(p.d, shared, [&](int64_t d0) {
    load_tile(shared.x_chunk, Layout::kChunkLd, kChunk, x, p.x_stride, r0, p.n, d0, p.d);
    load_tile(shared.y_chunk, Layout::kChunkLd, kChunk, y, p.y_stride, c0, p.m, d0, p.d);
  });
}

// How a row enters the pair values when the kernels fold in the normalisation (params.h, CudaPairRowsParams):
// s_ij = (x_i . y_j) r_i r_j with r = 1 / max(|row|, eps) and |u|^2 = (|row| r)^2 the scaled row's squared length;
// radial where the clamp is inactive (the normalisation's Jacobian then removes the row's own direction). Without
// normalising, r = 1, |u|^2 = |row|^2 and nothing is radial.
template <class Acc>
struct RowScale {
  Acc inverse;
  Acc length2;
  bool radial;
};

// The RowScale of entry `index` of the squared row norms `sq` (nullptr: 0, where nothing needs them).
template <class Acc>
__device__ __forceinline__ RowScale<Acc> row_scale(const void* sq, int64_t index, bool normalize) {
  const Acc squared = sq != nullptr ? static_cast<const Acc*>(sq)[index] : Acc(0);
  if (!normalize) return {Acc(1), squared, false};
  const Acc norm = std::sqrt(squared);
  const bool radial = norm > Acc(kNormEps);
  const Acc inverse = Acc(1) / (radial ? norm : Acc(kNormEps));
  return {inverse, squared * inverse * inverse, radial};
}

// Threads t < 64: the RowScale of the tile's column t (reference c0 + t; r = 1 past M) into shared.col_scales.
template <class Policy>
__device__ __forceinline__ void load_column_scales(const CudaPairRowsParams& p, int64_t c0,
                                                   SharedLayout<Policy>& shared) {
  using Acc = typename Policy::Acc;
  if (threadIdx.x < kTile) {
    const int64_t column = c0 + threadIdx.x;
    const RowScale<Acc> scale = column < p.m ? row_scale<Acc>(p.y_sq, column, p.normalize) : RowScale<Acc>{1, 0, false};
    shared.col_scales[threadIdx.x] = scale.inverse;
    shared.col_scales[kTile + threadIdx.x] = scale.length2;
    shared.col_scales[2 * kTile + threadIdx.x] = scale.radial ? Acc(1) : Acc(0);
  }
}

// Column j's RowScale as load_column_scales left it.
template <class Policy>
__device__ __forceinline__ RowScale<typename Policy::Acc> column_scale(const SharedLayout<Policy>& shared, int j) {
  return {shared.col_scales[j], shared.col_scales[kTile + j], shared.col_scales[2 * kTile + j] != 0};
}

// out[i] = |v_i|^2 (kInverse: 1 / max(|v_i|, eps)) of `count` vectors of `length` elements, element k of vector i
// at data[i * count_stride + k * length_stride] (rows: (stride, 1); W's columns: (1, w_stride), coalesced), summed
// in the accumulation type from the rows as stored: no converted copy of the rows.
template <class T, class Acc, bool kInverse>
__global__ void __launch_bounds__(kThreads) vector_norms_kernel(const T* data, int64_t count, int64_t length,
                                                                int64_t count_stride, int64_t length_stride,
                                                                Acc* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= count) return;
  Acc sum = 0;
  for (int64_t k = 0; k < length; ++k) {
    const Acc value = static_cast<Acc>(data[i * count_stride + k * length_stride]);
    sum += value * value;
  }
  if (kInverse) {
    const Acc norm = std::sqrt(sum);
    out[i] = Acc(1) / (norm > Acc(kNormEps) ? norm : Acc(kNormEps));
  } else {
    out[i] = sum;
  }
}

// The epilogues' split of a tile: this thread's row within the tile and its first column (then every second one).
__device__ __forceinline__ int epilogue_row() { return threadIdx.x >> 1; }
__device__ __forceinline__ int epilogue_column() { return threadIdx.x & 1; }

// The query row this thread folds in a row-block kernel (block blockIdx.x, rows r0 ..).
template <class Acc>
struct QueryRow {
  int64_t r0;            // the block's first row
  int local;             // this thread's row within the tile
  int64_t row;           // r0 + local
  bool live;             // row < N
  int64_t label;         // its label (0 past N)
  RowScale<Acc> scale;   // how it enters the pair values
};

template <class Acc>
__device__ __forceinline__ QueryRow<Acc> query_row(const CudaPairRowsParams& p) {
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int local = epilogue_row();
  const bool live = r0 + local < p.n;
  return {r0, local, r0 + local, live, live ? p.x_labels[r0 + local] : 0,
          live ? row_scale<Acc>(p.x_sq, r0 + local, p.normalize) : RowScale<Acc>{1, 0, false}};
}

// The block's dynamic shared memory, 128-byte aligned.
template <class T>
__device__ __forceinline__ T* dynamic_shared() {
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  return reinterpret_cast<T*>(shared_bytes);
}

// The same, carved into the regions of SharedLayout.
template <class Policy>
__device__ __forceinline__ SharedLayout<Policy> block_shared() {
  return SharedLayout<Policy>(dynamic_shared<unsigned char>());
}

// The row pass of a forward epilogue: walks the column tiles of the block's rows and calls
// visit(s, column_length2, column, positive, negative) on each pair of this thread's row (its half of the columns),
// s the scaled product (x_i . y_j) r_i r_j and column_length2 the reference's |u|^2. Every thread of the block calls
// it (it synchronises); the caller then meets its partner thread through from_partner.
template <class Policy, class Visit>
__device__ __forceinline__ void for_each_row_pair(const CudaPairRowsParams& p, const QueryRow<typename Policy::Acc>& query,
                                                  SharedLayout<Policy>& shared, Visit&& visit) {
  for (int64_t c0 = 0; c0 < p.m; c0 += kTile) {
    load_labels(shared.col_labels, p.y_labels, c0, p.m);
    load_column_scales(p, c0, shared);
    similarity_tile<Policy>(p, query.r0, c0, shared);
    if (query.live) {
      const int cols = static_cast<int>(p.m - c0 < kTile ? p.m - c0 : kTile);
#pragma unroll 1
      for (int j = epilogue_column(); j < cols; j += 2) {
        bool positive, negative;
        pair_kind(query.label, shared.col_labels[j], query.row, c0 + j, p.self_offset, positive, negative);
        const auto column = column_scale(shared, j);
        visit(shared.s[query.local * SharedLayout<Policy>::kAccLd + j] * query.scale.inverse * column.inverse,
              column.length2, c0 + j, positive, negative);
      }
    }
    __syncthreads();  // the next tile rewrites S, the labels and the scales
  }
}

// out[row0 + i, e0 + j] (= or +=, or atomically +=) the 64 x 64 tile staged in shared.s times `unscale`, within
// rows_total x d, minus the radial or norm term coefficients[i] times the gradient's own row, own[i * own_ld + j]
// (own: those rows at D columns e0..; coefficients nullptr: no such term).
enum class Write { kStore, kAdd, kAtomicAdd };

template <class Policy>
struct OwnRowTerm {
  const typename Policy::Acc* coefficients = nullptr;  // nullptr: none
  const typename Policy::Operand* own = nullptr;
  int64_t own_ld = 0;
};

template <class Policy>
__device__ void write_tile(typename Policy::Acc* out, int64_t row0, int64_t rows_total, int64_t e0, int64_t d,
                           Write mode, const SharedLayout<Policy>& shared, const OwnRowTerm<Policy>& term = {},
                           typename Policy::Acc unscale = 1) {
  using Acc = typename Policy::Acc;
#pragma unroll 1
  for (int index = threadIdx.x; index < kTile * kTile; index += kThreads) {
    const int i = index / kTile, j = index % kTile;
    const int64_t row = row0 + i, col = e0 + j;
    if (row >= rows_total || col >= d) continue;
    Acc value = shared.s[i * SharedLayout<Policy>::kAccLd + j] * unscale;
    if (term.coefficients != nullptr) value -= term.coefficients[i] * static_cast<Acc>(term.own[i * term.own_ld + j]);
    auto* target = out + row * d + col;
    if (mode == Write::kAtomicAdd) {
      atomicAdd(target, value);
    } else {
      *target = mode == Write::kAdd ? *target + value : value;
    }
  }
}

template <class T>
__device__ __forceinline__ T from_partner(T value) {
  return __shfl_xor_sync(0xffffffffu, value, 1);
}

// body(Policy{}) with the tile policy of the operand type (tile_mma.cuh), or `fallback` for an unknown one.
template <class Result, class Body>
Result with_policy(Operand operand, Result fallback, Body&& body) {
  switch (operand) {
    case Operand::kFloat32: return body(SimtTile<float>{});
    case Operand::kTf32: return body(WmmaTile<Tf32>{});
    case Operand::kFloat16: return body(WmmaTile<__half>{});
    case Operand::kBFloat16: return body(WmmaTile<__nv_bfloat16>{});
    case Operand::kFloat64: return body(SimtTile<double>{});
  }
  return fallback;
}

// Launches `kernel` on `grid` blocks of kThreads threads with `bytes` of dynamic shared memory (opting in past the
// default 48 KB). cudaLaunchKernelEx rather than <<< >>>: it is plain C++, so the host emulation compiles it too.
template <class... Params, class... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, int64_t bytes, cudaStream_t stream, Args... args) {
  if (cudaError_t error =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)))
    return error;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = static_cast<size_t>(bytes);
  config.stream = stream;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

}  // namespace metric_kernels::cuda
