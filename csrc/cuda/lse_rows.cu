// CUDA kernels of the row-statistics family (every loss but batch-hard) on the engine of engine.cuh, with the
// per-loss math of epilogue.h (the same functions as the CPU kernels):
//   forward:  per 64-row block, walk the column tiles, fold each S tile into four statistics per row (NT-Xent: twice);
//   backward: recompute each tile, form dS from the saved statistics and upstream gradients, and accumulate
//             dX = dS Y (grid: row blocks x 64-wide D slices) and dY = dS^T X (column blocks x D slices), or dY
//             atomically from the dX pass.
#ifdef METRIC_KERNELS_HOST_EMULATION
#include "host_emulation.h"
#else
#include <cuda_runtime.h>
#endif

#include "engine.cuh"
#include "launch.h"

namespace metric_kernels::cuda {
namespace {

// __launch_bounds__(kThreads, 2) on every kernel: asking for two resident blocks lets ptxas use up to 255 registers
// per thread; with the thread count alone it aims at 128 and spills the tensor-core accumulators
// (tests/test_cuda_compile.py checks that no kernel spills).

template <class Policy>
__global__ void __launch_bounds__(kThreads, 2) lse_rows_forward_kernel(const CudaPairRowsParams p,
                                                                      typename Policy::Acc* stats) {
  using Acc = typename Policy::Acc;
  SharedLayout<Policy> shared = block_shared<Policy>();
  const QueryRow query = query_row(p);
  const Acc a = static_cast<Acc>(p.a), b = static_cast<Acc>(p.b);
  const Acc row_sq = query.live ? squared_norm<Acc>(p.x_sq, query.row) : Acc(0);
  OnlineLse<Acc> first, second;
  Acc linear = 0;  // SupCon: the sum of the positives' values
  Acc positive_sum = 0, negative_sum = 0, positive_count = 0, negative_count = 0;  // Contrastive (epilogue.h)
  for_each_row_pair<Policy>(p, query, shared, [&](Acc s, int64_t column, bool positive, bool negative) {
    const Acc v = pair_value(p.pair_value, s, row_sq, squared_norm<Acc>(p.y_sq, column));
    if (p.kind == kContrastive) {
      const Acc h = contrastive_hinge(v, a, b, positive, negative);
      if (positive) positive_sum += h, positive_count += h > 0 ? Acc(1) : Acc(0);
      if (negative) negative_sum += h, negative_count += h > 0 ? Acc(1) : Acc(0);
      return;
    }
    const Logits<Acc> logits = loss_logits(p.kind, v, a, b);
    if (in_first(p.kind, positive)) first.add(logits.value1);
    if (in_second(p.kind, positive, negative)) second.add(logits.value2);
    if (p.kind == kSupCon && positive) linear += v;
  });
  Acc out[kStatRows];
  if (p.kind == kContrastive) {
    out[0] = positive_sum + from_partner(positive_sum);
    out[1] = negative_sum + from_partner(negative_sum);
    out[2] = positive_count + from_partner(positive_count);
    out[3] = negative_count + from_partner(negative_count);
  } else {
    const Acc first_max = from_partner(first.max), first_sum = from_partner(first.sum);
    const Acc second_max = from_partner(second.max), second_sum = from_partner(second.sum);
    linear += from_partner(linear);
    first.merge(first_max, first_sum);
    second.merge(second_max, second_sum);
    out[0] = first.finish(), out[1] = second.finish(), out[2] = linear, out[3] = 0;
  }
  if (p.kind == kNTXent) {
    // The second sweep, over the positives, with the row's logsumexp over its negatives (both threads hold it).
    const Acc lse = out[1];
    Acc loss = 0, weight = 0, nonzero = 0;
    for_each_row_pair<Policy>(p, query, shared, [&](Acc s, int64_t column, bool positive, bool) {
      if (positive) ntxent_positive(lse - b * pair_value(p.pair_value, s, row_sq, squared_norm<Acc>(p.y_sq, column)),
                                    loss, weight, nonzero);
    });
    out[0] = loss + from_partner(loss);
    out[2] = weight + from_partner(weight);
    out[3] = nonzero + from_partner(nonzero);
  }
  if (query.live && epilogue_column() == 0)
    for (int q = 0; q < kStatRows; ++q) stats[q * p.n + query.row] = out[q];
}

// Upstream gradients, statistics and labels of rows r0 .. r0 + 63 into shared memory (zeros past N).
template <class Policy>
__device__ void load_row_state(const CudaPairRowsBackwardParams& bp, int64_t r0, SharedLayout<Policy>& shared) {
  using Acc = typename Policy::Acc;
  const CudaPairRowsParams& p = bp.pair;
  const auto* grad = static_cast<const Acc*>(bp.grad);
  const auto* stats = static_cast<const Acc*>(bp.stats);
  if (threadIdx.x < kTile) {
    const int64_t row = r0 + threadIdx.x;
    const bool live = row < p.n;
    for (int q = 0; q < 3; ++q) shared.row_state[q * kTile + threadIdx.x] = live ? grad[q * p.n + row] : Acc(0);
    for (int q = 0; q < 3; ++q)
      shared.row_state[(3 + q) * kTile + threadIdx.x] = live ? stats[q * p.n + row] : Acc(0);
    shared.row_labels[threadIdx.x] = live ? p.x_labels[row] : 0;
  }
}

// shared.ds = dS of the tile in shared.s (rows r0.., columns c0..); zero past N or M. Needs the row state and both
// label vectors in shared memory; the caller synchronises before using dS. Returns this thread's part of its row's
// sum of dS (as stored: the operand the products read), which the distances' norm term needs.
template <class Policy>
__device__ typename Policy::Acc ds_tile(const CudaPairRowsParams& p, int64_t r0, int64_t c0,
                                        SharedLayout<Policy>& shared) {
  using Acc = typename Policy::Acc;
  using Layout = SharedLayout<Policy>;
  const Acc a = static_cast<Acc>(p.a), b = static_cast<Acc>(p.b);
  const int local = epilogue_row();
  const int64_t row = r0 + local;
  const Acc g1 = shared.row_state[local], g2 = shared.row_state[kTile + local];
  const Acc g3 = shared.row_state[2 * kTile + local];
  const Acc lse1 = shared.row_state[3 * kTile + local], lse2 = shared.row_state[4 * kTile + local];
  const Acc aux = shared.row_state[5 * kTile + local];
  const Acc row_sq = row < p.n ? squared_norm<Acc>(p.x_sq, row) : Acc(0);
  Acc sum = 0;
#pragma unroll 1
  for (int j = epilogue_column(); j < kTile; j += 2) {
    const int64_t col = c0 + j;
    Acc ds = 0;
    if (row < p.n && col < p.m) {
      bool positive, negative;
      pair_kind(shared.row_labels[local], shared.col_labels[j], row, col, p.self_offset, positive, negative);
      ds = ds_entry(p.kind, p.pair_value, shared.s[local * Layout::kAccLd + j], row_sq,
                    squared_norm<Acc>(p.y_sq, col), a, b, positive, negative, g1, g2, g3, lse1, lse2, aux);
    }
    const auto stored = Policy::to_operand(ds);
    shared.ds[local * Layout::kTileLd + j] = stored;
    sum += static_cast<Acc>(stored);
  }
  return sum;
}

// Thread t < 64: shared.sums[t] = column t's sum of the dS tile (threads past 64 do nothing). Between the barrier
// after ds_tile and the next write of dS.
template <class Policy>
__device__ void column_sums(SharedLayout<Policy>& shared) {
  using Acc = typename Policy::Acc;
  if (threadIdx.x >= kTile) return;
  Acc sum = 0;
#pragma unroll 1
  for (int i = 0; i < kTile; ++i) sum += static_cast<Acc>(shared.ds[i * SharedLayout<Policy>::kTileLd + threadIdx.x]);
  shared.sums[threadIdx.x] = sum;
}

template <class Policy, bool kAtomic>
__global__ void __launch_bounds__(kThreads, 2) lse_rows_backward_dx_kernel(const CudaPairRowsBackwardParams bp) {
  using Acc = typename Policy::Acc;
  using Operand = typename Policy::Operand;
  using Layout = SharedLayout<Policy>;
  Layout shared = block_shared<Policy>();
  const CudaPairRowsParams& p = bp.pair;
  const auto* x = static_cast<const Operand*>(p.x);
  const auto* y = static_cast<const Operand*>(p.y);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile, e0 = static_cast<int64_t>(blockIdx.y) * kTile;

  const bool norm_term = has_norm_term(p.pair_value);
  load_row_state(bp, r0, shared);
  if (kAtomic) load_tile(shared.out_rows, Layout::kTileLd, kTile, x, p.x_stride, r0, p.n, e0, p.d);
  typename Policy::Accumulator dx;
  Policy::zero(dx);
  Acc row_sum = 0;  // this thread's part of its row's sum of dS
  for (int64_t c0 = 0; c0 < p.m; c0 += kTile) {
    load_labels(shared.col_labels, p.y_labels, c0, p.m);
    similarity_tile<Policy>(p, r0, c0, shared);
    row_sum += ds_tile<Policy>(p, r0, c0, shared);
    load_tile(shared.out, Layout::kTileLd, kTile, y, p.y_stride, c0, p.m, e0, p.d);
    __syncthreads();
    Policy::template mma<RowMajor, RowMajor>(dx, shared.ds, Layout::kTileLd, shared.out, Layout::kTileLd, kTile);
    if (kAtomic) {
      // dY[c0.., e0..] += dS^T X[r0.., e0..]: a column-major read of dS is its transpose; the norm term's rows
      // Y[c0.., e0..] are in shared.out
      if (norm_term) column_sums(shared);
      typename Policy::Accumulator dy;
      Policy::zero(dy);
      Policy::template mma<ColMajor, RowMajor>(dy, shared.ds, Layout::kTileLd, shared.out_rows, Layout::kTileLd,
                                               kTile);
      Policy::store(dy, shared.s, Layout::kAccLd);  // S was last read by ds_tile, before the barrier above
      __syncthreads();
      write_tile<Policy>(static_cast<Acc*>(bp.dy), c0, p.m, e0, p.d, Write::kAtomicAdd, shared,
                         {norm_term ? shared.sums : nullptr, shared.out, Layout::kTileLd});
    }
    __syncthreads();  // the next tile rewrites the chunks, S, dS, the sums and the labels
  }
  if (bp.dx == nullptr) return;
  row_sum += from_partner(row_sum);
  if (epilogue_column() == 0) shared.sums[epilogue_row()] = row_sum;
  Policy::store(dx, shared.s, Layout::kAccLd);
  __syncthreads();
  // When dy is dx, other blocks add dY into these rows at the same time.
  const Write mode = kAtomic && bp.dy == bp.dx ? Write::kAtomicAdd : Write::kStore;
  write_tile<Policy>(static_cast<Acc*>(bp.dx), r0, p.n, e0, p.d, mode, shared,
                     {norm_term ? shared.sums : nullptr, x + r0 * p.x_stride + e0, p.x_stride});
}

template <class Policy>
__global__ void __launch_bounds__(kThreads, 2) lse_rows_backward_dy_kernel(const CudaPairRowsBackwardParams bp) {
  using Acc = typename Policy::Acc;
  using Operand = typename Policy::Operand;
  using Layout = SharedLayout<Policy>;
  Layout shared = block_shared<Policy>();
  const CudaPairRowsParams& p = bp.pair;
  const auto* x = static_cast<const Operand*>(p.x);
  const auto* y = static_cast<const Operand*>(p.y);
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile, e0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const bool norm_term = has_norm_term(p.pair_value);

  load_labels(shared.col_labels, p.y_labels, c0, p.m);
  typename Policy::Accumulator dy;
  Policy::zero(dy);
  Acc column_sum = 0;  // threads t < 64: column t's sum of dS
  for (int64_t r0 = 0; r0 < p.n; r0 += kTile) {
    load_row_state(bp, r0, shared);
    similarity_tile<Policy>(p, r0, c0, shared);
    ds_tile<Policy>(p, r0, c0, shared);
    load_tile(shared.out, Layout::kTileLd, kTile, x, p.x_stride, r0, p.n, e0, p.d);
    __syncthreads();
    Policy::template mma<ColMajor, RowMajor>(dy, shared.ds, Layout::kTileLd, shared.out, Layout::kTileLd, kTile);
    if (norm_term) {
      column_sums(shared);
      if (threadIdx.x < kTile) column_sum += shared.sums[threadIdx.x];  // this thread's own entry
    }
    __syncthreads();
  }
  if (threadIdx.x < kTile) shared.sums[threadIdx.x] = column_sum;
  Policy::store(dy, shared.s, Layout::kAccLd);
  __syncthreads();
  write_tile<Policy>(static_cast<Acc*>(bp.dy), c0, p.m, e0, p.d, bp.accumulate_dy ? Write::kAdd : Write::kStore,
                     shared, {norm_term ? shared.sums : nullptr, y + c0 * p.y_stride + e0, p.y_stride});
}

template <class Policy>
cudaError_t forward(const CudaPairRowsParams& p, void* stats, cudaStream_t stream) {
  return launch(lse_rows_forward_kernel<Policy>, dim3(blocks(p.n)), SharedLayout<Policy>::kForwardBytes, stream, p,
                static_cast<typename Policy::Acc*>(stats));
}

template <class Policy>
cudaError_t backward(const CudaPairRowsBackwardParams& bp, cudaStream_t stream) {
  const CudaPairRowsParams& p = bp.pair;
  const auto slices = static_cast<unsigned>(blocks(p.d));
  if (bp.atomic) {
    return launch(lse_rows_backward_dx_kernel<Policy, true>, dim3(blocks(p.n), slices),
                  SharedLayout<Policy>::kAtomicBackwardBytes, stream, bp);
  }
  const int64_t bytes = SharedLayout<Policy>::kBackwardBytes;
  if (bp.dx != nullptr) {
    if (cudaError_t error = launch(lse_rows_backward_dx_kernel<Policy, false>, dim3(blocks(p.n), slices), bytes,
                                   stream, bp))
      return error;
  }
  if (bp.dy != nullptr) {
    // Stream order puts it after the dX pass, so accumulating into dx (dy == dx) sees the finished dX.
    return launch(lse_rows_backward_dy_kernel<Policy>, dim3(blocks(p.m), slices), bytes, stream, bp);
  }
  return cudaSuccess;
}

}  // namespace

int lse_rows_forward(const CudaPairRowsParams& p, void* stats, void* stream) {
  if (p.n == 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  return with_policy(p.operand, cudaErrorInvalidValue,
                     [&](auto policy) { return forward<decltype(policy)>(p, stats, s); });
}

int lse_rows_backward(const CudaPairRowsBackwardParams& bp, void* stream) {
  if (bp.pair.n == 0 || bp.pair.m == 0 || bp.pair.d == 0) return cudaSuccess;
  if (bp.atomic && !supports_atomic_backward(bp.pair.operand)) return cudaErrorInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  return with_policy(bp.pair.operand, cudaErrorInvalidValue,
                     [&](auto policy) { return backward<decltype(policy)>(bp, s); });
}

bool supports_atomic_backward(Operand operand) { return operand != Operand::kFloat64; }

namespace {
template <class Policy>
int64_t backward_bytes(bool atomic) {
  return atomic ? SharedLayout<Policy>::kAtomicBackwardBytes : SharedLayout<Policy>::kBackwardBytes;
}
}  // namespace

int64_t backward_shared_bytes(Operand operand, bool atomic) {
  return with_policy(operand, int64_t{0},
                     [&](auto policy) { return backward_bytes<decltype(policy)>(atomic); });
}

int64_t shared_bytes_per_block(int device) {
  int bytes = 0;
  if (cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) return 0;
  return bytes;
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace metric_kernels::cuda
