// CUDA kernels of the row-statistics family (every loss but batch-hard) on the engine of engine.cuh, with the
// per-loss math of epilogue.h (the same functions as the CPU kernels):
//   forward:  per 64-row block, walk the column tiles, fold each S tile into four statistics per row (NT-Xent: twice;
//             the triplet margin loss: a sweep filling each anchor's row of the positive table, then one meeting its
//             negatives with it, two statistics and a row of weights per anchor);
//   backward: recompute each tile once per pass, form dS from the saved statistics (the triplet margin loss: its table
//             and weights) and upstream gradients, and
//             accumulate dX = dS Y (grid: row blocks x spans of D up to 256 wide) and dY = dS^T X (column blocks x
//             spans), or dY atomically from the dX pass: 3 matmul-equivalents (atomic) or 4 (deterministic) for
//             D <= 256 (fp64: 64).
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
                                                                      typename Policy::Acc* stats, bool resident) {
  using Acc = typename Policy::Acc;
  SharedLayout<Policy> shared = block_shared<Policy>(resident);
  const QueryRow<Acc> query = query_row<Acc>(p);
  const Acc a = static_cast<Acc>(p.a), b = static_cast<Acc>(p.b);
  const Acc row_length2 = query.scale.length2;
  OnlineLse<Acc> first, second;
  Acc linear = 0;  // SupCon: the sum of the positives' values
  Acc positive_sum = 0, negative_sum = 0, positive_count = 0, negative_count = 0;  // Contrastive (epilogue.h)
  for_each_row_pair<Policy>(p, query, shared, resident, [&](Acc s, Acc column_length2, int64_t, bool positive,
                                                            bool negative) {
    const Acc v = pair_value(p.pair_value, s, row_length2, column_length2);
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
    const AngularMargin<Acc> margin(a);
    Acc loss = 0, weight = 0, nonzero = 0;
    for_each_row_pair<Policy>(p, query, shared, resident, [&](Acc s, Acc column_length2, int64_t, bool positive, bool) {
      if (positive)
        ntxent_positive(lse - b * margin.value(pair_value(p.pair_value, s, row_length2, column_length2)), loss,
                        weight, nonzero);
    });
    out[0] = loss + from_partner(loss);
    out[2] = weight + from_partner(weight);
    out[3] = nonzero + from_partner(nonzero);
  }
  if (query.live && epilogue_column() == 0)
    for (int q = 0; q < kStatRows; ++q) stats[q * p.n + query.row] = out[q];
}

// The triplet margin loss's forward (kTripletMargin, p.a the margin): per 64-row block two sweeps over the references,
// the first writing the block's rows of the positive table, table[a, rank[p]] = margin - v_ap, the second meeting
// every negative with them: stats[0, a] and stats[1, a] (the sum of the anchor's triplet losses, how many are
// nonzero; 2 x N) and weights[a, r] (the sum of the slot's slopes over the negatives). The block owns its anchors'
// rows of the table and the weights, written whole: no atomics, and no launch of the caller's to fill them.
template <class Policy>
__global__ void __launch_bounds__(kThreads, 2) triplet_margin_forward_kernel(const CudaPairRowsParams p,
                                                                            const CudaTripletSlots slots,
                                                                            typename Policy::Acc* stats,
                                                                            typename Policy::Acc* table,
                                                                            typename Policy::Acc* weights,
                                                                            bool resident) {
  using Acc = typename Policy::Acc;
  using Layout = SharedLayout<Policy>;
  constexpr Acc kEmpty = -std::numeric_limits<Acc>::infinity();  // a slot no positive fills
  SharedLayout<Policy> shared = block_shared<Policy>(resident);
  const QueryRow<Acc> query = query_row<Acc>(p);
  const int64_t width = slots.slot_count;
  const int64_t block_rows = p.n - query.r0 < kTile ? p.n - query.r0 : kTile;
  for (int64_t index = threadIdx.x; index < block_rows * width; index += kThreads) {
    table[query.r0 * width + index] = kEmpty;
    weights[query.r0 * width + index] = 0;
  }
  __syncthreads();  // the first sweep fills the slots of both threads of a row
  Acc* const row_table = table + (query.live ? query.row : query.r0) * width;
  Acc* const row_weights = weights + (query.live ? query.row : query.r0) * width;
  Acc* const s_row = shared.s() + query.local * Layout::kAccLd;
  Acc loss = 0, nonzero = 0;
  if (width > 0) {  // else no anchor has a positive
    const Acc margin = static_cast<Acc>(p.a);
    for_each_row_pair<Policy>(p, query, shared, resident, [&](Acc s, Acc column_length2, int64_t column,
                                                              bool positive, bool) {
      if (!positive) return;
      const int64_t slot = slots.rank[column];
      if (slot >= 0 && slot < width)  // a rank that is not positive_slots' writes nothing out of bounds
        row_table[slot] = margin - pair_value(p.pair_value, s, query.scale.length2, column_length2);
    });
    // Each thread takes every other slot of its row over the whole tile row, so that it alone adds to those weights
    // (splitting the columns instead would need a shuffle per slot to merge them): its negatives' pair values take
    // the place of their products in S, which both threads of the row then read.
    for_each_row_pair<Policy>(
        p, query, shared, resident,
        [&](Acc s, Acc column_length2, int64_t column, bool, bool negative) {
          if (negative)
            s_row[column & (kTile - 1)] = pair_value(p.pair_value, s, query.scale.length2, column_length2);
        },
        [&](int64_t c0, int cols) {
          __syncthreads();  // the partner's pair values are in S
          if (!query.live) return;
          uint64_t negatives = 0;  // by the tile's column
#pragma unroll 1
          for (int j = 0; j < cols; ++j) {
            bool positive, negative;
            pair_kind(query.label, shared.col_labels()[j], query.row, c0 + j, p.self_offset, positive, negative);
            if (negative) negatives |= uint64_t{1} << j;
          }
#pragma unroll 1
          for (int64_t r = epilogue_column(); r < width; r += 2) {
            const Acc t = row_table[r];
            if (t == kEmpty) continue;  // -inf + a NaN or +inf pair value would be NaN where no triplet is
            Acc part = 0, count = 0, slope = 0;
#pragma unroll 1
            for (int k = 0; k < kTile / 2; ++k) {
              // both threads' columns in the epilogues' order: a warp's reads of S stay on distinct banks
              for (int side = 0; side < 2; ++side) {
                const int j = epilogue_column_of<Policy>((static_cast<int>(threadIdx.x) & ~1) | side, k);
                if (!(negatives >> j & 1)) continue;
                const TripletTerm<Acc> term = triplet_margin_term(s_row[j] + t, slots.smooth);
                part += term.loss;
                count += term.loss > 0 ? Acc(1) : Acc(0);  // PML counts the nonzero losses
                slope += term.slope;
              }
            }
            loss += part, nonzero += count;
            row_weights[r] += slope;
          }
        });
  }
  loss += from_partner(loss);
  nonzero += from_partner(nonzero);
  if (query.live && epilogue_column() == 0) {
    stats[query.row] = loss;
    stats[p.n + query.row] = nonzero;
  }
}

// Upstream gradients, statistics, RowScale and labels of rows r0 .. r0 + 63 into shared memory (zeros past N).
template <class Policy>
__device__ void load_row_state(const CudaPairRowsBackwardParams& bp, int64_t r0, SharedLayout<Policy>& shared) {
  using Acc = typename Policy::Acc;
  const CudaPairRowsParams& p = bp.pair;
  const auto* grad = static_cast<const Acc*>(bp.grad);
  const auto* stats = static_cast<const Acc*>(bp.stats);
  // The triplet margin kind has one upstream gradient per row and no statistics (its dS reads the table).
  const int grad_rows = p.kind == kTripletMargin ? 1 : 3;
  if (threadIdx.x < kTile) {
    const int64_t row = r0 + threadIdx.x;
    const bool live = row < p.n;
    for (int q = 0; q < 3; ++q)
      shared.row_state()[q * kTile + threadIdx.x] = live && q < grad_rows ? grad[q * p.n + row] : Acc(0);
    for (int q = 0; q < 3; ++q)
      shared.row_state()[(3 + q) * kTile + threadIdx.x] = live && stats != nullptr ? stats[q * p.n + row] : Acc(0);
    store_row_scale(shared.row_state() + 6 * kTile, threadIdx.x,
                    live ? row_scale<Acc>(p.x_sq, row, p.normalize) : RowScale<Acc>{1, 0, false});
    shared.row_labels()[threadIdx.x] = live ? p.x_labels[row] : 0;
  }
}

template <class Policy>
__device__ __forceinline__ RowScale<typename Policy::Acc> row_state_scale(const SharedLayout<Policy>& shared, int i) {
  return stored_row_scale(shared.row_state() + 6 * kTile, i);
}

template <class Acc>
__device__ __forceinline__ Acc gradient_scale_of(const CudaPairRowsBackwardParams& bp) {
  return bp.gradient_scale != nullptr ? *static_cast<const Acc*>(bp.gradient_scale) : Acc(1);
}

// A row's (or column's) coefficient c of its own direction in its gradient, dX_i = sum_j P_ij y_j / g - c_i r_i^2 x_i
// (P = dS r_i r_j g, what the products read): sum dS s where the normalisation is radial (unit rows), else the
// distances' norm term sum dS (q's |u|^2 term: dL/d|u|^2 = -dS / 2 twice), else nothing. One pair's share.
template <class Acc>
__device__ __forceinline__ Acc own_direction_term(Acc ds, Acc s, bool radial, bool norm_term) {
  return radial ? ds * s : (norm_term ? ds : Acc(0));
}

// dS of pair (row, col) for the triplet margin kind, g its row's upstream gradient (epilogue.h's triplet_margin_dv on
// the row's slots of the forward's table and weights).
template <class Acc>
__device__ __forceinline__ Acc triplet_margin_ds(const CudaPairRowsBackwardParams& bp, int64_t row, int64_t col, Acc s,
                                                 Acc x_sq, Acc y_sq, bool positive, bool negative, Acc g) {
  const int64_t width = bp.triplet.slot_count;
  const Acc v = pair_value(bp.pair.pair_value, s, x_sq, y_sq);
  const Acc dv = triplet_margin_dv(v, positive, negative, bp.triplet.smooth, g,
                                   static_cast<const Acc*>(bp.table) + row * width,
                                   static_cast<const Acc*>(bp.weights) + row * width, width, bp.triplet.rank[col]);
  return pair_slope(bp.pair.pair_value, dv, v);
}

// From the raw products in shared.s() (rows r0.., columns c0..; the column scales loaded): shared.ds() = P, the
// products' operand (0 past N or M), and shared.s() = each pair's share of its column's own-direction coefficient
// (own_direction_term). Needs the row state and both label vectors in shared memory; the caller synchronises before
// reading either tile. Returns this thread's share of its row's coefficient. dS is taken back from P as stored, so
// the products and the own-direction term see the same rounded 16-bit gradient.
template <class Policy>
__device__ typename Policy::Acc ds_tile(const CudaPairRowsBackwardParams& bp, int64_t r0, int64_t c0,
                                        SharedLayout<Policy>& shared) {
  using Acc = typename Policy::Acc;
  using Operand = typename Policy::Operand;
  using Layout = SharedLayout<Policy>;
  const CudaPairRowsParams& p = bp.pair;
  const Acc a = static_cast<Acc>(p.a), b = static_cast<Acc>(p.b), g = gradient_scale_of<Acc>(bp);
  const AngularMargin<Acc> margin(p.kind == kNTXent ? a : Acc(0));
  const bool norm_term = has_norm_term(p.pair_value);
  const int local = epilogue_row();
  const int64_t row = r0 + local;
  const Acc g1 = shared.row_state()[local], g2 = shared.row_state()[kTile + local];
  const Acc g3 = shared.row_state()[2 * kTile + local];
  const Acc lse1 = shared.row_state()[3 * kTile + local], lse2 = shared.row_state()[4 * kTile + local];
  const Acc aux = shared.row_state()[5 * kTile + local];
  const RowScale<Acc> row_scale_ = row_state_scale(shared, local);
  Acc* s_row = shared.s() + local * Layout::kAccLd;
  Acc sum = 0;
#pragma unroll 1
  for (int k = 0; k < kTile / 2; ++k) {
    const int j = epilogue_column<Policy>(k);
    const int64_t col = c0 + j;
    Acc ds = 0, s = 0;
    Operand stored = Policy::to_operand(Acc(0));
    const RowScale<Acc> column = column_scale(shared, j);
    if (row < p.n && col < p.m) {
      bool positive, negative;
      pair_kind(shared.row_labels()[local], shared.col_labels()[j], row, col, p.self_offset, positive, negative);
      s = s_row[j] * row_scale_.inverse * column.inverse;
      ds = p.kind == kTripletMargin
               ? triplet_margin_ds(bp, row, col, s, row_scale_.length2, column.length2, positive, negative, g1)
               : ds_entry(p.kind, p.pair_value, s, row_scale_.length2, column.length2, a, b, margin, positive,
                          negative, g1, g2, g3, lse1, lse2, aux);
      const Acc scaled = ds * row_scale_.inverse * column.inverse * g;
      stored = Policy::to_operand(scaled);
      if (!std::is_same<Operand, Acc>::value) ds = scaled != Acc(0) ? ds * (static_cast<Acc>(stored) / scaled) : Acc(0);
    }
    shared.ds()[local * Layout::kTileLd + j] = stored;
    sum += own_direction_term(ds, s, row_scale_.radial, norm_term);
    s_row[j] = own_direction_term(ds, s, column.radial, norm_term);
  }
  return sum;
}

// The coefficient write_tile takes from a row's (column's) summed own-direction shares: c r^2, the gradient's term
// being -c r^2 times the raw row (own_direction_term).
template <class Acc>
__device__ __forceinline__ Acc own_coefficient(Acc shares, Acc inverse) {
  return shares * inverse * inverse;
}

// Thread t < 64: shared.sums()[t] = column t's sum of shared.s() (what ds_tile left there: the columns' own-direction
// shares). Between the barrier after ds_tile and the next write of S.
template <class Policy>
__device__ void column_sums(SharedLayout<Policy>& shared) {
  if (threadIdx.x < kTile) shared.sums()[threadIdx.x] = column_sum(shared);
}

// Whether the gradients have an own-direction term at all (the normalisation or the distances' norms).
__device__ __forceinline__ bool has_own_direction_term(const CudaPairRowsParams& p) {
  return p.normalize || has_norm_term(p.pair_value);
}

// The dX pass: rows r0.. against every column tile, dX = P Y for the block's span of D (one S per tile); kAtomic also
// adds dY = P^T X of each tile into dy atomically (3 matmul-equivalents in all instead of 4).
// kResident: the block's rows of X stay in shared memory for all its column tiles (keeps_resident). A template
// argument, not a kernel argument as in the forward kernels: with the choice made at run time the deterministic
// passes, at the register limit with four dX slices, spilled on sm_90a.
template <class Policy, bool kAtomic, bool kResident>
__global__ void __launch_bounds__(kThreads, 2) lse_rows_backward_dx_kernel(const CudaPairRowsBackwardParams bp) {
  constexpr bool resident = kResident;
  using Acc = typename Policy::Acc;
  using Operand = typename Policy::Operand;
  using Layout = SharedLayout<Policy>;
  Layout shared = block_shared<Policy>(resident);
  const CudaPairRowsParams& p = bp.pair;
  const auto* x = static_cast<const Operand*>(p.x);
  const auto* y = static_cast<const Operand*>(p.y);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile, span0 = static_cast<int64_t>(blockIdx.y) * kSpan<Policy, kAtomic>;
  const Acc unscale = Acc(1) / gradient_scale_of<Acc>(bp);
  const bool own_term = has_own_direction_term(p);
  constexpr int kInRegisters = kSlices<Policy, kAtomic>, kInShared = kSharedSlices<Policy, kAtomic>;
  const int64_t shared_span0 = span0 + int64_t{kInRegisters} * kTile;  // the first of the slices in shared memory
  load_row_state(bp, r0, shared);
  if (resident) load_resident_rows(x, p.x_stride, r0, p.n, p.d, shared);
  typename Policy::Accumulator dx[kInRegisters];
#pragma unroll
  for (int slice = 0; slice < kInRegisters; ++slice) Policy::zero(dx[slice]);
  if (kInShared > 0) {
    const int count = shared_slices_used<Policy, kAtomic>(p.d) * Layout::kAccumulatorSliceBytes / sizeof(Acc);
    for (int index = threadIdx.x; index < count; index += kThreads) shared.accumulator_slice(0)[index] = Acc(0);
  }
  Acc row_sum = 0;  // this thread's share of its row's own-direction coefficient
  for (int64_t c0 = 0; c0 < p.m; c0 += kTile) {
    load_labels(shared.col_labels(), p.y_labels, c0, p.m);
    load_column_scales(p, c0, shared);
    similarity_tile<Policy>(p, r0, c0, shared, resident ? Resident::kRows : Resident::kNone);
    row_sum += ds_tile<Policy>(bp, r0, c0, shared);
    __syncthreads();
    if (kAtomic && own_term) {  // the columns' coefficients, from the shares ds_tile left in S
      column_sums(shared);
      if (threadIdx.x < kTile)
        shared.sums()[threadIdx.x] = own_coefficient(shared.sums()[threadIdx.x], shared.col_scales()[threadIdx.x]);
    }
    if (kAtomic) {
      // dY[c0.., e0..] += P^T X[r0.., e0..] / g minus the columns' own-direction term (its rows Y[c0.., e0..] read
      // from global memory): a column-major read of P is its transpose; X's slice from the resident rows or loaded.
      // A loop of its own, not unrolled, apart from the dX slices below: the dX accumulators leave few registers.
#pragma unroll 1
      for (int64_t e0 = span0; e0 < span0 + kSpan<Policy, kAtomic> && e0 < p.d; e0 += kTile) {
        __syncthreads();  // the previous slice's readers of out_rows and S are done (and column_sums)
        if (!resident) {
          load_tile_async(shared.out_rows(), Layout::kTileLd, kTile, x, p.x_stride, r0, p.n, e0, p.d);
          finish_async_copies();
          __syncthreads();
        }
        const Operand* rows = resident ? shared.resident_rows() + e0 : shared.out_rows();
        Policy::template product_to<ColMajor, RowMajor>(shared.s(), Layout::kAccLd, shared.ds(), Layout::kTileLd,
                                                        rows, resident ? Layout::kResidentLd : Layout::kTileLd, kTile);
        __syncthreads();
        write_tile<Policy>(static_cast<Acc*>(bp.dy), c0, p.m, e0, p.d, Write::kAtomicAdd, shared.s(),
                           {own_term ? shared.sums() : nullptr, y + c0 * p.y_stride + e0, p.y_stride}, unscale);
      }
    }
    const auto load_y = [&](int64_t e0) {
      load_tile_async(shared.out(), Layout::kTileLd, kTile, y, p.y_stride, c0, p.m, e0, p.d);
    };
    accumulate_slices<RowMajor>(dx, shared, span0, p.d, load_y);
    if (kInShared > 0) accumulate_shared_slices<RowMajor, kInShared>(shared, shared_span0, p.d, load_y);
    __syncthreads();  // the next tile rewrites the chunks, S, dS, the sums, the labels and the scales
  }
  if (bp.dx == nullptr) return;
  row_sum += from_partner(row_sum);
  if (epilogue_column() == 0)
    shared.sums()[epilogue_row()] = own_coefficient(row_sum, row_state_scale(shared, epilogue_row()).inverse);
  // When dy is dx, other blocks add dY into these rows at the same time.
  const Write mode = kAtomic && bp.dy == bp.dx ? Write::kAtomicAdd : Write::kStore;
  const Acc* coefficients = own_term ? shared.sums() : nullptr;
  const Operand* own = x + r0 * p.x_stride;
  write_slices(dx, shared, static_cast<Acc*>(bp.dx), r0, p.n, span0, p.d, mode, coefficients, own, p.x_stride,
               unscale);
  for (int slice = 0; slice < kInShared && shared_span0 + slice * kTile < p.d; ++slice) {
    const int64_t e0 = shared_span0 + slice * kTile;
    write_tile<Policy>(static_cast<Acc*>(bp.dx), r0, p.n, e0, p.d, mode, shared.accumulator_slice(slice),
                       {coefficients, own + e0, p.x_stride}, unscale);
  }
}

// The dY pass of the deterministic backward: columns c0.. against every row tile, dY = P^T X for the block's span of
// D (one S per tile).
// kResident: the block's rows of Y stay in shared memory for all its row tiles (as in the dX pass).
template <class Policy, bool kResident>
__global__ void __launch_bounds__(kThreads, 2) lse_rows_backward_dy_kernel(const CudaPairRowsBackwardParams bp) {
  constexpr bool resident = kResident;
  using Acc = typename Policy::Acc;
  using Operand = typename Policy::Operand;
  using Layout = SharedLayout<Policy>;
  Layout shared = block_shared<Policy>(resident);
  const CudaPairRowsParams& p = bp.pair;
  const auto* x = static_cast<const Operand*>(p.x);
  const auto* y = static_cast<const Operand*>(p.y);
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile, span0 = static_cast<int64_t>(blockIdx.y) * kSpan<Policy>;
  const Acc unscale = Acc(1) / gradient_scale_of<Acc>(bp);
  const bool own_term = has_own_direction_term(p);

  load_labels(shared.col_labels(), p.y_labels, c0, p.m);
  load_column_scales(p, c0, shared);
  if (resident) load_resident_rows(y, p.y_stride, c0, p.m, p.d, shared);
  typename Policy::Accumulator dy[kSlices<Policy>];
#pragma unroll
  for (int slice = 0; slice < kSlices<Policy>; ++slice) Policy::zero(dy[slice]);
  Acc column_sum = 0;  // threads t < 64: column t's own-direction coefficient
  for (int64_t r0 = 0; r0 < p.n; r0 += kTile) {
    load_row_state(bp, r0, shared);
    similarity_tile<Policy>(p, r0, c0, shared, resident ? Resident::kColumns : Resident::kNone);
    ds_tile<Policy>(bp, r0, c0, shared);
    __syncthreads();
    if (own_term) {
      column_sums(shared);
      if (threadIdx.x < kTile) column_sum += shared.sums()[threadIdx.x];  // this thread's own entry
    }
    accumulate_slices<ColMajor>(dy, shared, span0, p.d, [&](int64_t e0) {
      load_tile_async(shared.out(), Layout::kTileLd, kTile, x, p.x_stride, r0, p.n, e0, p.d);
    });
    __syncthreads();  // the next tile rewrites the row state, the chunks, S, dS and out
  }
  if (threadIdx.x < kTile) shared.sums()[threadIdx.x] = own_coefficient(column_sum, shared.col_scales()[threadIdx.x]);
  write_slices(dy, shared, static_cast<Acc*>(bp.dy), c0, p.m, span0, p.d,
               bp.accumulate_dy ? Write::kAdd : Write::kStore, own_term ? shared.sums() : nullptr,
               y + c0 * p.y_stride, p.y_stride, unscale);
}

template <class Policy>
cudaError_t forward(const CudaPairRowsParams& p, void* stats, cudaStream_t stream) {
  const int64_t bytes = SharedLayout<Policy>::kForwardBytes;
  const bool resident = keeps_resident<Policy>(p.d, bytes);
  return launch(lse_rows_forward_kernel<Policy>, dim3(blocks(p.n)), resident_bytes<Policy>(bytes, resident), stream,
                p, static_cast<typename Policy::Acc*>(stats), resident);
}

template <class Policy>
cudaError_t triplet_forward(const CudaPairRowsParams& p, const CudaTripletSlots& slots, void* stats, void* table,
                            void* weights, cudaStream_t stream) {
  using Acc = typename Policy::Acc;
  const int64_t bytes = SharedLayout<Policy>::kForwardBytes;
  const bool resident = keeps_resident<Policy>(p.d, bytes);
  return launch(triplet_margin_forward_kernel<Policy>, dim3(blocks(p.n)), resident_bytes<Policy>(bytes, resident),
                stream, p, slots, static_cast<Acc*>(stats), static_cast<Acc*>(table), static_cast<Acc*>(weights),
                resident);
}

// The pair value's slope bound |dv/ds| (a distance's plain form: 2^11 keeps 1 / (2 v) in range down to distances of
// about 2.4e-4, where a 16-bit operand's rounding dominates anyway).
template <class Acc>
__device__ __forceinline__ Acc pair_value_slope(int pair) {
  return pair == kSimilarity ? Acc(1) : (pair == kSquaredEuclidean ? Acc(2) : Acc(2048));
}

// Per row, a bound of |dL/dv_ij| from the upstream gradients g of its statistics: the log-sum-exp kinds
// (g1 + g2) |b| (2 + |a|) + g3 (a softmax weight times a logit's slope; Circle's |v| <= 1), NT-Xent
// |b| (g1 (1 + W) + g2) times its angular margin's slope bound, Contrastive g1 + g2, the triplet margin loss g1 times
// the larger of K (a negative's slopes, at most 1 per slot) and the row's largest weight (a positive's).
template <class Acc>
__device__ __forceinline__ Acc pair_gradient_bound(const CudaPairRowsBackwardParams& bp, int64_t row) {
  const CudaPairRowsParams& p = bp.pair;
  const auto* grad = static_cast<const Acc*>(bp.grad);
  if (p.kind == kTripletMargin) {
    const int64_t width = bp.triplet.slot_count;
    const Acc* weights = static_cast<const Acc*>(bp.weights) + row * width;
    Acc largest = static_cast<Acc>(width);
    for (int64_t r = 0; r < width; ++r)
      largest = weights[r] > largest || weights[r] != weights[r] ? weights[r] : largest;
    return std::fabs(grad[row]) * largest;
  }
  const auto* stats = static_cast<const Acc*>(bp.stats);
  const Acc g1 = std::fabs(grad[row]), g2 = std::fabs(grad[p.n + row]), g3 = std::fabs(grad[2 * p.n + row]);
  const Acc a = std::fabs(static_cast<Acc>(p.a)), b = std::fabs(static_cast<Acc>(p.b));
  if (p.kind == kNTXent)
    return b * (g1 * (Acc(1) + stats[2 * p.n + row]) + g2) * AngularMargin<Acc>(static_cast<Acc>(p.a)).slope_bound();
  if (p.kind == kContrastive) return g1 + g2;
  return (g1 + g2) * (b * (Acc(2) + a)) + g3;
}

// One block: *bp.gradient_scale = 2^(14 - ceil(log2(max_i bound_i r_i * max_j r_j))), the product clamped to
// [2^-100, 2^100] before the log, which brings every P = dS r_i r_j g to at most 2^14 in magnitude: the small
// softmax terms stay clear of fp16's subnormals and the largest of its range (65504) keeps a factor 4 of headroom
// for plain distances shorter than the slope bound assumes (P saturates there, WmmaTile::to_operand). A NaN bound
// makes g NaN, as the gradients.
template <class Acc>
__global__ void __launch_bounds__(kThreads) gradient_scale_kernel(const CudaPairRowsBackwardParams bp) {
  Acc* row_largest = dynamic_shared<Acc>();
  Acc* column_largest = row_largest + kThreads;
  const CudaPairRowsParams& p = bp.pair;
  const Acc slope = pair_value_slope<Acc>(p.pair_value);
  Acc rows = 0, columns = 0;
  for (int64_t i = threadIdx.x; i < p.n; i += kThreads) {
    const Acc bound = pair_gradient_bound<Acc>(bp, i) * slope * row_scale<Acc>(p.x_sq, i, p.normalize).inverse;
    rows = bound > rows || bound != bound ? bound : rows;
  }
  for (int64_t j = threadIdx.x; j < p.m; j += kThreads) {
    const Acc inverse = row_scale<Acc>(p.y_sq, j, p.normalize).inverse;
    columns = inverse > columns ? inverse : columns;
  }
  row_largest[threadIdx.x] = rows, column_largest[threadIdx.x] = columns;
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int t = 1; t < kThreads; ++t) {
    rows = row_largest[t] > rows || row_largest[t] != row_largest[t] ? row_largest[t] : rows;
    columns = column_largest[t] > columns ? column_largest[t] : columns;
  }
  Acc largest = rows * columns;
  if (largest == largest) largest = largest < Acc(0x1p-100) ? Acc(0x1p-100) : (largest > Acc(0x1p100) ? Acc(0x1p100) : largest);
  *static_cast<Acc*>(bp.gradient_scale) = std::exp2(Acc(14) - std::ceil(std::log2(largest)));
}

template <class Policy>
cudaError_t backward(const CudaPairRowsBackwardParams& bp, cudaStream_t stream) {
  using Acc = typename Policy::Acc;
  const CudaPairRowsParams& p = bp.pair;
  if (bp.gradient_scale != nullptr) {
    if (cudaError_t error = launch(gradient_scale_kernel<Acc>, dim3(1), 2 * kThreads * sizeof(Acc), stream, bp))
      return error;
  }
  const unsigned slices = spans<Policy>(p.d);
  if (bp.atomic) {
    const int64_t bytes = SharedLayout<Policy>::atomic_backward_bytes(p.d);
    const bool resident = keeps_resident<Policy>(p.d, bytes);
    return launch(resident ? lse_rows_backward_dx_kernel<Policy, true, true>
                           : lse_rows_backward_dx_kernel<Policy, true, false>,
                  dim3(blocks(p.n), spans<Policy, true>(p.d)), resident_bytes<Policy>(bytes, resident), stream, bp);
  }
  const int64_t bytes = SharedLayout<Policy>::kBackwardBytes;
  const bool resident = keeps_resident<Policy>(p.d, bytes);
  if (bp.dx != nullptr) {
    if (cudaError_t error = launch(resident ? lse_rows_backward_dx_kernel<Policy, false, true>
                                            : lse_rows_backward_dx_kernel<Policy, false, false>,
                                   dim3(blocks(p.n), slices), resident_bytes<Policy>(bytes, resident), stream, bp))
      return error;
  }
  if (bp.dy != nullptr) {
    // Stream order puts it after the dX pass, so accumulating into dx (dy == dx) sees the finished dX.
    return launch(resident ? lse_rows_backward_dy_kernel<Policy, true> : lse_rows_backward_dy_kernel<Policy, false>,
                  dim3(blocks(p.m), slices), resident_bytes<Policy>(bytes, resident), stream, bp);
  }
  return cudaSuccess;
}

template <class Operand, class Acc>
cudaError_t squared_norms(const void* rows, int64_t count, int64_t d, int64_t stride, void* out, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  return launch(vector_norms_kernel<Operand, Acc, false>, dim3(static_cast<unsigned>((count + kThreads - 1) / kThreads)),
                0, stream, static_cast<const Operand*>(rows), count, d, stride, int64_t{1}, static_cast<Acc*>(out));
}

}  // namespace

int lse_rows_forward(const CudaPairRowsParams& p, void* stats, void* stream) {
  if (p.n == 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  return with_policy(p.operand, cudaErrorInvalidValue,
                     [&](auto policy) { return forward<decltype(policy)>(p, stats, s); });
}

int triplet_margin_forward(const CudaPairRowsParams& p, const CudaTripletSlots& slots, void* stats, void* table,
                           void* weights, void* stream) {
  if (p.n == 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  return with_policy(p.operand, cudaErrorInvalidValue, [&](auto policy) {
    return triplet_forward<decltype(policy)>(p, slots, stats, table, weights, s);
  });
}

int lse_rows_backward(const CudaPairRowsBackwardParams& bp, void* stream) {
  if (bp.pair.n == 0 || bp.pair.m == 0 || bp.pair.d == 0) return cudaSuccess;
  if (bp.atomic && !supports_atomic_backward(bp.pair.operand)) return cudaErrorInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  return with_policy(bp.pair.operand, cudaErrorInvalidValue,
                     [&](auto policy) { return backward<decltype(policy)>(bp, s); });
}

int squared_row_norms(Operand operand, const void* rows, int64_t count, int64_t d, int64_t stride, void* out,
                      void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return with_policy(operand, cudaErrorInvalidValue, [&](auto policy) {
    using Policy = decltype(policy);
    return squared_norms<typename Policy::Operand, typename Policy::Acc>(rows, count, d, stride, out, s);
  });
}

bool supports_atomic_backward(Operand operand) { return operand != Operand::kFloat64; }

int64_t atomic_backward_span(Operand operand) {
  return with_policy(operand, int64_t{0}, [](auto policy) { return kSpan<decltype(policy), true>; });
}

namespace {
template <class Policy>
int64_t backward_bytes(bool atomic, int64_t d) {
  return atomic ? SharedLayout<Policy>::atomic_backward_bytes(d) : SharedLayout<Policy>::kBackwardBytes;
}
}  // namespace

int64_t backward_shared_bytes(Operand operand, bool atomic, int64_t d) {
  return with_policy(operand, int64_t{0},
                     [&](auto policy) { return backward_bytes<decltype(policy)>(atomic, d); });
}

int64_t shared_bytes_per_block(int device) {
  int bytes = 0;
  if (cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) return 0;
  return bytes;
}

int64_t shared_bytes_of_current_device() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  return shared_bytes_per_block(device);
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace metric_kernels::cuda
