// CUDA kernels of the margin-softmax classifiers (ArcFace, CosFace, SubCenterArcFace, NormalizedSoftmax,
// SphereFace, LargeMarginSoftmax) on the engine of engine.cuh, the same problem as the CPU kernels
// (csrc/cpu/margin_softmax.cpp, whose comment has the math): the queries X (N x D) against the columns of W (D x J,
// J = classes * sub_centers), both read raw, with inverse norms (a kernel here; 1 for a side left raw) folded into
// each tile, cos = (x . w) rx rw:
//   forward:  per 64-row block, walk W in tiles of whole classes (64 / sub_centers of them), a class's cosine the
//             largest of its sub-centres'; fold scale * cos of the other classes into an online log-sum-exp and keep
//             the label's cosine;
//   backward: recompute each tile once per pass, dS at each class's chosen column scaled by the inverse norms, and
//             accumulate dX = dS W^T (grid: row blocks x spans of D up to 256 wide; fp64: 64) and dW = X^T dS (class
//             tiles x spans), each with the normalisation's radial term from the row (column) sums of dS cos:
//             2 matmul-equivalents a pass for D <= 256 (fp64: 64), deterministic; or (bp.atomic) dW added from the
//             dX pass's tiles through atomics, each tile's columns with their own part of the radial term:
//             3 matmul-equivalents in all.
#ifdef METRIC_KERNELS_HOST_EMULATION
#include "host_emulation.h"
#else
#include <cuda_runtime.h>
#endif

#include <cmath>

#include "engine.cuh"
#include "launch.h"

namespace metric_kernels::cuda {
namespace {

// Whether a row (column) has the normalisation's radial term: not where it is left raw (its inverse norm is then
// 1), nor where its norm is clamped at eps (the normalisation is then a plain division).
template <class Acc>
__device__ __forceinline__ bool radial(Acc inverse, bool normalized) {
  return normalized && inverse < Acc(1) / Acc(kNormEps);
}

// shared.s() = X[r0 : r0 + 64] . W[:, j0 : j0 + 64] (columns past j_end read as 0), raw products (X's rows from
// shared.resident_rows() where `resident`). Ends synchronised.
template <class Policy>
__device__ void classifier_tile(const CudaMarginSoftmaxParams& p, int64_t r0, int64_t j0, int64_t j_end,
                                SharedLayout<Policy>& shared, bool resident = false) {
  using Layout = SharedLayout<Policy>;
  using Operand = typename Policy::Operand;
  const auto* x = static_cast<const Operand*>(p.x);
  const auto* w = static_cast<const Operand*>(p.w);
  product_tile<Policy>(p.d, shared, [&](int64_t d0, int stage) {
    if (!resident) load_tile_async(shared.x_chunk(stage), Layout::kChunkLd, kChunk, x, p.x_stride, r0, p.n, d0, p.d);
    load_transposed_tile(shared.y_chunk(stage), Layout::kChunkLd, kChunk, w, p.w_stride, d0, p.d, j0, j_end);
  }, resident ? Resident::kRows : Resident::kNone);
}

// The class tiles: 64 / sub_centers whole classes each.
struct ClassTile {
  int64_t c0;   // first class
  int classes;  // how many
  int64_t j0;   // first column of W
  int64_t j_end;
};

__device__ __forceinline__ ClassTile class_tile(const CudaMarginSoftmaxParams& p, int64_t c0) {
  const int64_t per_tile = kTile / p.sub_centers, left = p.classes - c0;
  const int classes = static_cast<int>(left < per_tile ? left : per_tile);
  const int64_t j0 = c0 * p.sub_centers;
  return {c0, classes, j0, j0 + classes * p.sub_centers};
}

template <class Acc>
struct ClassCosine {
  Acc value;
  int pick;  // the sub-centre it came from
};

// Softmax pooling of class c's sub-centre cosines v_k (SoftTriple, pool_scale > 0): p_k = softmax(pool_scale v)_k,
// pooled cosine sum_k p_k v_k, whose derivative in v_k is weight(v_k) = p_k (1 + pool_scale (v_k - pooled)).
template <class Acc>
struct SoftPool {
  Acc top, sum, pooled, pool_scale;
  __device__ SoftPool(const Acc* s_row, const Acc* w_inverse, int64_t j0, int c, int sub_centers, Acc rx, Acc scale)
      : top(-INFINITY), sum(0), pooled(0), pool_scale(scale) {
    const int base = c * sub_centers;
    for (int k = 0; k < sub_centers; ++k) top = fmax(top, s_row[base + k] * w_inverse[j0 + base + k] * rx);
    Acc weighted = 0;
    for (int k = 0; k < sub_centers; ++k) {
      const Acc value = s_row[base + k] * w_inverse[j0 + base + k] * rx;
      const Acc e = exponential(pool_scale * (value - top));
      sum += e;
      weighted += e * value;  // a NaN value makes both NaN, and so the pooled cosine
    }
    pooled = weighted / sum;
  }
  __device__ Acc weight(Acc value) const {
    return exponential(pool_scale * (value - top)) / sum * (Acc(1) + pool_scale * (value - pooled));
  }
};

// Class c of the tile row s_row: its largest sub-centre cosine (the first of equal ones; NaN wins), or with
// pool_scale > 0 the softmax-weighted mean of them (SoftPool; pick 0).
template <class Acc>
__device__ __forceinline__ ClassCosine<Acc> class_cosine(const Acc* s_row, const Acc* w_inverse, int64_t j0, int c,
                                                         int sub_centers, Acc rx, Acc pool_scale) {
  const int base = c * sub_centers;
  if (sub_centers > 1 && pool_scale > Acc(0))
    return {SoftPool<Acc>(s_row, w_inverse, j0, c, sub_centers, rx, pool_scale).pooled, 0};
  ClassCosine<Acc> best{s_row[base] * w_inverse[j0 + base] * rx, 0};
  for (int k = 1; k < sub_centers; ++k) {
    const Acc value = s_row[base + k] * w_inverse[j0 + base + k] * rx;
    if (value > best.value || value != value) best = {value, k};
  }
  return best;
}

template <class Policy>
__global__ void __launch_bounds__(kThreads, 2) margin_softmax_forward_kernel(const CudaMarginSoftmaxParams p,
                                                                            typename Policy::Acc* stats,
                                                                            bool resident) {
  using Acc = typename Policy::Acc;
  using Layout = SharedLayout<Policy>;
  Layout shared = block_shared<Policy>(resident);
  const auto* x_inverse = static_cast<const Acc*>(p.x_inverse);
  const auto* w_inverse = static_cast<const Acc*>(p.w_inverse);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int local = epilogue_row();
  const int64_t row = r0 + local;
  const bool live = row < p.n;
  const int64_t label = live ? p.labels[row] : -1;
  const Acc rx = live ? x_inverse[row] : Acc(0), scale = static_cast<Acc>(p.scale);
  const Acc pool_scale = static_cast<Acc>(p.pool_scale);
  const int sub_centers = static_cast<int>(p.sub_centers);
  OnlineLse<Acc> others;
  Acc target = 0;  // the label's cosine, held by the thread whose columns have it
  if (resident) load_resident_rows(static_cast<const typename Policy::Operand*>(p.x), p.x_stride, r0, p.n, p.d, shared);
  for (int64_t c0 = 0; c0 < p.classes; c0 += kTile / p.sub_centers) {
    const ClassTile tile = class_tile(p, c0);
    classifier_tile<Policy>(p, r0, tile.j0, tile.j_end, shared, resident);
    if (live) {
      const Acc* s_row = shared.s() + local * Layout::kAccLd;
#pragma unroll 1
      for (int c = epilogue_column(); c < tile.classes; c += 2) {
        const Acc cosine = class_cosine(s_row, w_inverse, tile.j0, c, sub_centers, rx, pool_scale).value;
        if (c0 + c == label) {
          target = cosine;
        } else {
          others.add(scale * cosine);
        }
      }
    }
    __syncthreads();  // the next tile rewrites S
  }
  const Acc partner_max = from_partner(others.max), partner_sum = from_partner(others.sum);
  others.merge(partner_max, partner_sum);
  target += from_partner(target);
  if (live && epilogue_column() == 0) {
    stats[row] = others.sum != others.sum ? others.sum : others.finish();  // NaN stays NaN
    stats[p.n + row] = target;
  }
}

// Rows r0 .. r0 + 63's upstream gradients, log-sum-exp, inverse norm and label into shared memory.
template <class Policy>
__device__ void load_classifier_rows(const CudaMarginSoftmaxBackwardParams& bp, int64_t r0,
                                     SharedLayout<Policy>& shared) {
  using Acc = typename Policy::Acc;
  const CudaMarginSoftmaxParams& p = bp.rows;
  const auto* grad = static_cast<const Acc*>(bp.grad);
  const auto* stats = static_cast<const Acc*>(bp.stats);
  const auto* x_inverse = static_cast<const Acc*>(p.x_inverse);
  if (threadIdx.x < kTile) {
    const int64_t row = r0 + threadIdx.x;
    const bool live = row < p.n;
    shared.row_state()[threadIdx.x] = live ? grad[row] : Acc(0);
    shared.row_state()[kTile + threadIdx.x] = live ? grad[p.n + row] : Acc(0);
    shared.row_state()[2 * kTile + threadIdx.x] = live ? stats[row] : Acc(0);
    shared.row_state()[3 * kTile + threadIdx.x] = live ? x_inverse[row] : Acc(0);
    shared.row_labels()[threadIdx.x] = live ? p.labels[row] : -1;
  }
}

// From the tile of raw products in shared.s(): shared.ds() = dS rx rw at each class's chosen column (0 at the other
// sub-centres, past N and past the tile's classes), as the products' operand; shared.s() = dS cos at the same columns
// (the dW pass's column sums read it). dS = g_target for the label's class, g_lse scale softmax for the others.
// Softmax pooling (pool_scale > 0) spreads dS over every column j of the class as g_j = dS SoftPool::weight(v_j):
// ds() = g_j rx rw, s() = g_j v_j. Returns this thread's part of its row's sum of those s() values. The caller
// synchronises before reading either tile.
template <class Policy>
__device__ typename Policy::Acc classifier_ds_tile(const CudaMarginSoftmaxParams& p, int64_t r0, const ClassTile& tile,
                                                   SharedLayout<Policy>& shared) {
  using Acc = typename Policy::Acc;
  using Layout = SharedLayout<Policy>;
  const auto* w_inverse = static_cast<const Acc*>(p.w_inverse);
  const int local = epilogue_row();
  const bool live = r0 + local < p.n;
  const Acc g_lse = shared.row_state()[local], g_target = shared.row_state()[kTile + local];
  const Acc lse = shared.row_state()[2 * kTile + local], rx = shared.row_state()[3 * kTile + local];
  const int64_t label = shared.row_labels()[local];
  const Acc scale = static_cast<Acc>(p.scale), pool_scale = static_cast<Acc>(p.pool_scale);
  const int sub_centers = static_cast<int>(p.sub_centers);
  const bool pooled = sub_centers > 1 && pool_scale > Acc(0);
  Acc* s_row = shared.s() + local * Layout::kAccLd;
  auto* ds_row = shared.ds() + local * Layout::kTileLd;
  Acc dot = 0;
#pragma unroll 1
  for (int c = epilogue_column(); c < tile.classes; c += 2) {
    if (pooled) {  // the pool read from this row's own columns before they are overwritten below
      const SoftPool<Acc> pool(s_row, w_inverse, tile.j0, c, sub_centers, rx, pool_scale);
      const Acc ds = !live                    ? Acc(0)
                     : tile.c0 + c == label ? g_target
                                            : g_lse * scale * exponential(scale * pool.pooled - lse);
      for (int k = 0; k < sub_centers; ++k) {
        const int j = c * sub_centers + k;
        const Acc value = s_row[j] * w_inverse[tile.j0 + j] * rx, g = live ? ds * pool.weight(value) : Acc(0);
        dot += g * value;
        ds_row[j] = Policy::to_operand(g * rx * w_inverse[tile.j0 + j]);
        s_row[j] = g * value;
      }
      continue;
    }
    ClassCosine<Acc> cosine{Acc(0), 0};
    Acc ds = 0;
    if (live) {
      cosine = class_cosine(s_row, w_inverse, tile.j0, c, sub_centers, rx, pool_scale);
      ds = tile.c0 + c == label ? g_target : g_lse * scale * exponential(scale * cosine.value - lse);
    }
    dot += ds * cosine.value;
    for (int k = 0; k < sub_centers; ++k) {
      const int j = c * sub_centers + k;
      const bool chosen = k == cosine.pick;
      ds_row[j] = Policy::to_operand(chosen ? ds * rx * w_inverse[tile.j0 + j] : Acc(0));
      s_row[j] = chosen ? ds * cosine.value : Acc(0);
    }
  }
  for (int j = tile.classes * sub_centers + epilogue_column(); j < kTile; j += 2) {
    ds_row[j] = Policy::to_operand(Acc(0));
    s_row[j] = 0;
  }
  return dot;
}

// Thread t < 64: shared.sums()[t] = the radial coefficient of dW's column j0 + t, rw^2 times its sum of dS cos
// (column_sum of what classifier_ds_tile left in S), 0
// where the column has no radial term or lies past the tile's columns.
template <class Policy>
__device__ __forceinline__ void store_column_coefficient(const CudaMarginSoftmaxParams& p, const ClassTile& tile,
                                                         typename Policy::Acc dot, SharedLayout<Policy>& shared) {
  using Acc = typename Policy::Acc;
  const int64_t column = tile.j0 + threadIdx.x;
  const Acc rw = column < tile.j_end ? static_cast<const Acc*>(p.w_inverse)[column] : Acc(0);
  shared.sums()[threadIdx.x] = radial(rw, p.normalize_w) ? rw * rw * dot : Acc(0);
}

// dW (D x J, the accumulation type) at the class tile's columns and D columns e0.. gets, for each (e, j), the staged
// element staged[e * kAccLd + j] (dW's own orientation) minus the column's radial coefficient times
// W[e0 + e, j0 + j]: stored, or added atomically (other blocks add to the same columns). Consecutive threads take
// consecutive columns: consecutive words of the staged tile, consecutive addresses of dW.
template <class Policy>
__device__ void write_weight_gradient(const CudaMarginSoftmaxParams& p, const ClassTile& tile, int64_t e0,
                                      const typename Policy::Acc* staged, const typename Policy::Acc* coefficients,
                                      typename Policy::Acc* out, Write mode) {
  using Acc = typename Policy::Acc;
  const auto* w = static_cast<const typename Policy::Operand*>(p.w);
  const int64_t columns = p.classes * p.sub_centers;
#pragma unroll 1
  for (int index = threadIdx.x; index < kTile * kTile; index += kThreads) {
    const int j = index % kTile, e = index / kTile;
    const int64_t column = tile.j0 + j, dim = e0 + e;
    if (column >= tile.j_end || dim >= p.d) continue;
    const Acc value = staged[e * SharedLayout<Policy>::kAccLd + j] -
                      coefficients[j] * static_cast<Acc>(w[dim * p.w_stride + column]);
    if (mode == Write::kAtomicAdd) {
      atomicAdd(out + dim * columns + column, value);
    } else {
      out[dim * columns + column] = value;
    }
  }
}

// The dX pass: rows r0.. against every class tile, dX = dS W^T for the block's span of D (one product tile per class
// tile); kAtomic also adds dW = X^T dS of each tile, with its columns' radial terms, into bp.dw atomically (3
// matmul-equivalents a column in all instead of 4). kAtomic keeps two dX slices in registers and the next two in
// shared memory (engine.cuh's kSlices / kSharedSlices), as the pair losses' atomic pass does.
template <class Policy, bool kAtomic>
__global__ void __launch_bounds__(kThreads, 2) margin_softmax_dx_kernel(const CudaMarginSoftmaxBackwardParams bp,
                                                                        bool resident) {
  using Acc = typename Policy::Acc;
  using Operand = typename Policy::Operand;
  using Layout = SharedLayout<Policy>;
  Layout shared = block_shared<Policy>(resident);
  const CudaMarginSoftmaxParams& p = bp.rows;
  const auto* x = static_cast<const Operand*>(p.x);
  const auto* w = static_cast<const Operand*>(p.w);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t span0 = static_cast<int64_t>(blockIdx.y) * kSpan<Policy, kAtomic>;
  constexpr int kInRegisters = kSlices<Policy, kAtomic>, kInShared = kSharedSlices<Policy, kAtomic>;
  const int64_t shared_span0 = span0 + int64_t{kInRegisters} * kTile;  // the first of the slices in shared memory
  load_classifier_rows(bp, r0, shared);
  if (resident) load_resident_rows(x, p.x_stride, r0, p.n, p.d, shared);
  typename Policy::Accumulator dx[kInRegisters];
#pragma unroll
  for (int slice = 0; slice < kInRegisters; ++slice) Policy::zero(dx[slice]);
  if (kInShared > 0) {
    const int count = shared_slices_used<Policy, kAtomic>(p.d) * Layout::kAccumulatorSliceBytes / sizeof(Acc);
    for (int index = threadIdx.x; index < count; index += kThreads) shared.accumulator_slice(0)[index] = Acc(0);
  }
  Acc row_dot = 0;
  for (int64_t c0 = 0; c0 < p.classes; c0 += kTile / p.sub_centers) {
    const ClassTile tile = class_tile(p, c0);
    classifier_tile<Policy>(p, r0, tile.j0, tile.j_end, shared, resident);
    row_dot += classifier_ds_tile<Policy>(p, r0, tile, shared);
    if (kAtomic) {
      __syncthreads();  // dS, and the dS cos in S that the column sums read
      if (threadIdx.x < kTile) store_column_coefficient(p, tile, column_sum(shared), shared);
      // X's slice from the resident rows or loaded. A loop of its own, not unrolled, apart from the dX slices below.
#pragma unroll 1
      for (int64_t e0 = span0; e0 < span0 + kSpan<Policy, kAtomic> && e0 < p.d; e0 += kTile) {
        __syncthreads();  // the previous slice's readers of out_rows and S are done (and the column sums)
        if (!resident) {
          load_tile_async(shared.out_rows(), Layout::kTileLd, kTile, x, p.x_stride, r0, p.n, e0, p.d);
          finish_async_copies();
          __syncthreads();
        }
        // dW[e][j] = sum_i X[r0 + i, e0 + e] dS[i][j], staged in dW's own orientation so that consecutive threads
        // read consecutive words of S and add to consecutive columns of dW
        const Operand* rows = resident ? shared.resident_rows() + e0 : shared.out_rows();
        Policy::template product_to<ColMajor, RowMajor>(shared.s(), Layout::kAccLd, rows,
                                                        resident ? Layout::kResidentLd : Layout::kTileLd, shared.ds(),
                                                        Layout::kTileLd, kTile);
        __syncthreads();
        write_weight_gradient<Policy>(p, tile, e0, shared.s(), shared.sums(), static_cast<Acc*>(bp.dw),
                                      Write::kAtomicAdd);
      }
    }
    // out[j][e] = W[e0 + e, j0 + j]: the tile's columns of W at the slice's D columns, as rows
    const auto load_w = [&](int64_t e0) {
      load_transposed_tile(shared.out(), Layout::kTileLd, kTile, w, p.w_stride, e0, p.d, tile.j0, tile.j_end);
    };
    accumulate_slices<RowMajor>(dx, shared, span0, p.d, load_w);
    if (kInShared > 0) accumulate_shared_slices<RowMajor, kInShared>(shared, shared_span0, p.d, load_w);
    __syncthreads();  // the next tile rewrites the chunks, S, dS, W's rows and the column sums
  }
  row_dot += from_partner(row_dot);
  if (epilogue_column() == 0) {
    const Acc rx = shared.row_state()[3 * kTile + epilogue_row()];
    shared.sums()[epilogue_row()] = radial(rx, p.normalize_x) ? rx * rx * row_dot : Acc(0);
  }
  const Operand* own = x + r0 * p.x_stride;
  write_slices(dx, shared, static_cast<Acc*>(bp.dx), r0, p.n, span0, p.d, Write::kStore, shared.sums(), own,
               p.x_stride);
  for (int slice = 0; slice < kInShared && shared_span0 + slice * kTile < p.d; ++slice) {
    const int64_t e0 = shared_span0 + slice * kTile;
    write_tile<Policy>(static_cast<Acc*>(bp.dx), r0, p.n, e0, p.d, Write::kStore, shared.accumulator_slice(slice),
                       {shared.sums(), own + e0, p.x_stride});
  }
}

// The dW pass: the class tile's columns against every row block, dW = X^T dS for the block's span of D (one product
// tile per row block).
template <class Policy>
__global__ void __launch_bounds__(kThreads, 2) margin_softmax_dw_kernel(const CudaMarginSoftmaxBackwardParams bp) {
  using Acc = typename Policy::Acc;
  using Operand = typename Policy::Operand;
  using Layout = SharedLayout<Policy>;
  Layout shared = block_shared<Policy>();
  const CudaMarginSoftmaxParams& p = bp.rows;
  const auto* x = static_cast<const Operand*>(p.x);
  const ClassTile tile = class_tile(p, static_cast<int64_t>(blockIdx.x) * (kTile / p.sub_centers));
  const int64_t span0 = static_cast<int64_t>(blockIdx.y) * kSpan<Policy>;
  typename Policy::Accumulator dw[kSlices<Policy>];
#pragma unroll
  for (int slice = 0; slice < kSlices<Policy>; ++slice) Policy::zero(dw[slice]);
  Acc dot = 0;  // threads t < 64: column t's sum of dS cos
  for (int64_t r0 = 0; r0 < p.n; r0 += kTile) {
    load_classifier_rows(bp, r0, shared);
    classifier_tile<Policy>(p, r0, tile.j0, tile.j_end, shared);
    classifier_ds_tile<Policy>(p, r0, tile, shared);
    __syncthreads();  // dS, and the dS cos in S that the column sums read
    if (threadIdx.x < kTile) dot += column_sum(shared);
    // dW[e][j] += sum_i X[i][e] dS[i][j] (X's slice read column-major is its transpose): dW's own orientation, so
    // that write_weight_gradient reads the staged slices along their rows
    for_each_slice<kSlices<Policy>>(
        span0, p.d,
        [&](int64_t e0) { load_tile_async(shared.out(), Layout::kTileLd, kTile, x, p.x_stride, r0, p.n, e0, p.d); },
        [&](int slice) {
          Policy::template mma<ColMajor, RowMajor>(dw[slice], shared.out(), Layout::kTileLd, shared.ds(),
                                                   Layout::kTileLd, kTile);
        });
    __syncthreads();  // the next block rewrites the row state, the chunks, S, dS and X's rows
  }
  if (threadIdx.x < kTile) store_column_coefficient(p, tile, dot, shared);
#pragma unroll
  for (int slice = 0; slice < kSlices<Policy>; ++slice) {
    const int64_t e0 = span0 + slice * kTile;
    if (e0 >= p.d) break;
    Policy::store(dw[slice], shared.s(), Layout::kAccLd);
    __syncthreads();
    write_weight_gradient<Policy>(p, tile, e0, shared.s(), shared.sums(), static_cast<Acc*>(bp.dw), Write::kStore);
    __syncthreads();  // the next slice rewrites S
  }
}

// out[0 .. count) = 1: the inverse norms of a side left raw.
template <class Acc>
__global__ void __launch_bounds__(kThreads) unit_scales_kernel(int64_t count, Acc* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i < count) out[i] = Acc(1);
}

template <class Policy>
cudaError_t inverse_norms(const CudaMarginSoftmaxParams& p, cudaStream_t stream) {
  using Acc = typename Policy::Acc;
  using Operand = typename Policy::Operand;
  const auto* x = static_cast<const Operand*>(p.x);
  const auto* w = static_cast<const Operand*>(p.w);
  const int64_t columns = p.classes * p.sub_centers;
  const auto grid = [](int64_t count) { return dim3(static_cast<unsigned>((count + kThreads - 1) / kThreads)); };
  if (p.n > 0) {
    auto* out = static_cast<Acc*>(p.x_inverse);
    if (cudaError_t error = p.normalize_x ? launch(vector_norms_kernel<Operand, Acc, true>, grid(p.n), 0, stream, x,
                                                   p.n, p.d, p.x_stride, int64_t{1}, out)
                                          : launch(unit_scales_kernel<Acc>, grid(p.n), 0, stream, p.n, out))
      return error;
  }
  if (columns == 0) return cudaSuccess;
  auto* out = static_cast<Acc*>(p.w_inverse);
  return p.normalize_w ? launch(vector_norms_kernel<Operand, Acc, true>, grid(columns), 0, stream, w, columns, p.d,
                                int64_t{1}, p.w_stride, out)
                       : launch(unit_scales_kernel<Acc>, grid(columns), 0, stream, columns, out);
}

template <class Policy>
cudaError_t forward(const CudaMarginSoftmaxParams& p, void* stats, cudaStream_t stream) {
  if (cudaError_t error = inverse_norms<Policy>(p, stream)) return error;
  const int64_t bytes = SharedLayout<Policy>::kForwardBytes;
  const bool resident = keeps_resident<Policy>(p.d, bytes);
  return launch(margin_softmax_forward_kernel<Policy>, dim3(static_cast<unsigned>(blocks(p.n))),
                resident_bytes<Policy>(bytes, resident), stream, p, static_cast<typename Policy::Acc*>(stats), resident);
}

template <class Policy>
cudaError_t backward(const CudaMarginSoftmaxBackwardParams& bp, cudaStream_t stream) {
  const CudaMarginSoftmaxParams& p = bp.rows;
  if (cudaError_t error = inverse_norms<Policy>(p, stream)) return error;
  if (bp.atomic) {  // dW from the dX pass; the caller zeroed it
    const int64_t bytes = SharedLayout<Policy>::atomic_backward_bytes(p.d);
    const bool resident = keeps_resident<Policy>(p.d, bytes);
    return launch(margin_softmax_dx_kernel<Policy, true>,
                  dim3(static_cast<unsigned>(blocks(p.n)), spans<Policy, true>(p.d)),
                  resident_bytes<Policy>(bytes, resident), stream, bp, resident);
  }
  const unsigned d_spans = spans<Policy>(p.d);
  const int64_t bytes = SharedLayout<Policy>::kBackwardBytes;
  if (bp.dx != nullptr) {
    const bool resident = keeps_resident<Policy>(p.d, bytes);
    if (cudaError_t error = launch(margin_softmax_dx_kernel<Policy, false>,
                                   dim3(static_cast<unsigned>(blocks(p.n)), d_spans),
                                   resident_bytes<Policy>(bytes, resident), stream, bp, resident))
      return error;
  }
  if (bp.dw != nullptr) {
    const int64_t per_tile = kTile / p.sub_centers;
    const auto tiles = static_cast<unsigned>((p.classes + per_tile - 1) / per_tile);
    return launch(margin_softmax_dw_kernel<Policy>, dim3(tiles, d_spans), bytes, stream, bp);
  }
  return cudaSuccess;
}

}  // namespace

int margin_softmax_forward(const CudaMarginSoftmaxParams& p, void* stats, void* stream) {
  if (p.n == 0 || p.classes == 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  return with_policy(p.operand, cudaErrorInvalidValue,
                     [&](auto policy) { return forward<decltype(policy)>(p, stats, s); });
}

int margin_softmax_backward(const CudaMarginSoftmaxBackwardParams& bp, void* stream) {
  const CudaMarginSoftmaxParams& p = bp.rows;
  if (p.n == 0 || p.classes == 0 || p.d == 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  return with_policy(p.operand, cudaErrorInvalidValue,
                     [&](auto policy) { return backward<decltype(policy)>(bp, s); });
}

}  // namespace metric_kernels::cuda
