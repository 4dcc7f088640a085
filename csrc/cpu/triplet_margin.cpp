#include "triplet_margin.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../epilogue.h"
#include "pair_tiles.h"
#include "tiling.h"
#include "vec_exp.h"

// An anchor's triplets are its positives (the table's finite slots) times its negatives: each tile row gathers its
// negatives' pair values into a dense buffer first, so that the loops over a positive slot run unmasked over
// negatives only. A slot left at -inf holds no positive and is skipped rather than added: -inf + a NaN or +inf
// negative value would be NaN where the reference has no triplet at all.
namespace metric_kernels::cpu {
namespace {

// torch.nn.functional.softplus's threshold (beta 1): above it the softplus is z itself and its slope 1.
template <typename T>
constexpr T kSoftplusLinear = T(20);

// Where torch's CPU softplus, log1p(exp(z)), becomes 0 and so its triplet stops counting as nonzero (PML counts
// loss > 0): its vectorised exp (Sleef) rounds results under 1.5 times T's smallest subnormal to 0, i.e. below
// z = log(1.5) + log(smallest subnormal) (-744.03 in float64, -102.87 in float32, measured so on torch's kernel).
template <typename T>
constexpr T kSoftplusZeroBelow =
    T(0.405465108108164382 +
      (std::numeric_limits<T>::min_exponent - std::numeric_limits<T>::digits) * 0.693147180559945309);

// f'(z), from z and, for the softplus, e = exp(-|z|): the sigmoid, 1 where torch's softplus is linear.
template <typename T, bool Smooth>
inline __attribute__((always_inline)) T triplet_slope(T z, T e) {
  if constexpr (Smooth) return z > kSoftplusLinear<T> ? T(1) : (z > 0 ? T(1) : e) / (T(1) + e);
  return z > 0 ? T(1) : T(0);
}

// Over one anchor's negatives (their pair values v[0 : count]) against one of its slots, t = margin - v_ap:
// loss += f(z), nonzero += [f(z) != 0], slope += f'(z) for z = v + t. relu keeps a NaN (z <= 0 is false for it), as
// torch.relu does, and its slope is [z > 0], as torch's. e: count entries of scratch.
template <typename T, bool Smooth>
inline __attribute__((always_inline)) void triplet_sums(const T* v, int64_t count, T t, T* e, T& loss, T& nonzero,
                                                        T& slope) {
  T loss_sum = 0, nonzero_sum = 0, slope_sum = 0;
  if constexpr (Smooth) {
    // softplus(z) = max(z, 0) + log1p(exp(-|z|)): the exponentials vectorised here, log1p (a libm call) below
#pragma omp simd reduction(+ : nonzero_sum, slope_sum)
    for (int64_t k = 0; k < count; ++k) {
      const T z = v[k] + t;
      const T ez = vexp(-std::fabs(z));
      slope_sum += triplet_slope<T, true>(z, ez);
      nonzero_sum += z > kSoftplusZeroBelow<T> ? T(1) : T(0);
      e[k] = ez;
    }
    for (int64_t k = 0; k < count; ++k) {
      const T z = v[k] + t;
      loss_sum += z > kSoftplusLinear<T> ? z : (z > 0 ? z : T(0)) + std::log1p(e[k]);
    }
  } else {
#pragma omp simd reduction(+ : loss_sum, nonzero_sum, slope_sum)
    for (int64_t k = 0; k < count; ++k) {
      const T z = v[k] + t;
      loss_sum += z <= 0 ? T(0) : z;
      nonzero_sum += z > 0 ? T(1) : T(0);
      slope_sum += triplet_slope<T, false>(z, T(0));
    }
  }
  loss += loss_sum, nonzero += nonzero_sum, slope += slope_sum;
}

// slope[k] += f'(v[k] + t) over one anchor's negatives against one of its slots.
template <typename T, bool Smooth>
inline __attribute__((always_inline)) void add_slopes(const T* v, int64_t count, T t, T* slope) {
#pragma omp simd
  for (int64_t k = 0; k < count; ++k) {
    const T z = v[k] + t;
    slope[k] += triplet_slope<T, Smooth>(z, Smooth ? vexp(-std::fabs(z)) : T(0));
  }
}

// The pair values of a tile row into value[0 : cols] (vectorised: the Euclidean distance's square root), then its
// negatives' gathered into negatives[0 : count], their columns into at (where not null). Returns count.
template <typename T, int Pair>
inline __attribute__((always_inline)) int64_t gather_negatives(const RowArgs<T>& r, const T* s, T* value,
                                                               T* negatives, int64_t* at) {
#pragma omp simd
  for (int64_t j = 0; j < r.cols; ++j)
    value[j] = pair_value(Pair, s[j], r.x_sq, Pair == kSimilarity ? T(0) : r.y_sq[j]);
  int64_t count = 0;
  for (int64_t j = 0; j < r.cols; ++j) {
    if (j == r.self_col || r.y_labels[j] == r.x_label) continue;
    if (at != nullptr) at[count] = j;
    negatives[count++] = value[j];
  }
  return count;
}

// One tile row of the forward's second sweep: the anchor's triplets with the tile's negatives, into its loss and
// nonzero count and its row of weights (K = slots entries, as its row of the table). value, negatives, e: cols
// entries of scratch each.
template <typename T, int Pair, bool Smooth>
inline __attribute__((always_inline)) void forward_row_impl(const RowArgs<T>& r, const T* s, const T* table,
                                                            int64_t slots, T* weights, T* value, T* negatives, T* e,
                                                            T& loss, T& nonzero) {
  int64_t count = -1;  // gathered at the first slot that holds a positive: a row without any needs none
  for (int64_t slot = 0; slot < slots; ++slot) {
    const T t = table[slot];
    if (t == -std::numeric_limits<T>::infinity()) continue;
    if (count < 0) count = gather_negatives<T, Pair>(r, s, value, negatives, static_cast<int64_t*>(nullptr));
    triplet_sums<T, Smooth>(negatives, count, t, e, loss, nonzero, weights[slot]);
  }
}

// One tile row of the backward: s[cols] in, the similarities; out, dS. dL/dv is -g weights[rank[p]] for a positive
// p and g times the sum of its slopes over the slots for a negative. Returns the row's sum of dS where the pair value
// has a norm term (0 otherwise). rank: the references' from the tile's first column; dv, negatives, slope: cols
// entries of scratch each, at: cols indices.
template <typename T, int Pair, bool Smooth>
inline __attribute__((always_inline)) T ds_row_impl(const RowArgs<T>& r, T* s, const T* table, const T* weights,
                                                    int64_t slots, const int64_t* rank, T g, T* dv, T* negatives,
                                                    T* slope, int64_t* at) {
  // dv holds the pair values until the slopes are summed, then dL/dv
  const int64_t count = gather_negatives<T, Pair>(r, s, dv, negatives, at);
  std::fill(slope, slope + count, T(0));
  for (int64_t slot = 0; slot < slots; ++slot) {
    const T t = table[slot];
    if (t != -std::numeric_limits<T>::infinity()) add_slopes<T, Smooth>(negatives, count, t, slope);
  }
  if constexpr (Pair != kSimilarity) std::copy(dv, dv + r.cols, s);  // pair_slope reads the value
  for (int64_t j = 0; j < r.cols; ++j)  // a reference of another label may rank past K: read positives' only
    dv[j] = j != r.self_col && r.y_labels[j] == r.x_label ? -g * weights[rank[j]] : T(0);
  for (int64_t k = 0; k < count; ++k) dv[at[k]] = g * slope[k];
  T sum = 0;
  if constexpr (Pair == kSimilarity) {
    std::copy(dv, dv + r.cols, s);
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < r.cols; ++j) {
      const T ds = pair_slope(Pair, dv[j], s[j]);
      s[j] = ds;
      sum += ds;
    }
  }
  return sum;
}

template <typename T>
using ForwardRowFn = void (*)(const RowArgs<T>&, const T*, const T*, int64_t, T*, T*, T*, T*, T&, T&);
template <typename T>
using DsRowFn = T (*)(const RowArgs<T>&, T*, const T*, const T*, int64_t, const int64_t*, T, T*, T*, T*, int64_t*);

template <typename T, int Pair, bool Smooth>
struct RowKernels {
  static void forward(const RowArgs<T>& r, const T* s, const T* table, int64_t slots, T* weights, T* value,
                      T* negatives, T* e, T& loss, T& nonzero) {
    forward_row_impl<T, Pair, Smooth>(r, s, table, slots, weights, value, negatives, e, loss, nonzero);
  }
  MK_AVX2 static void forward_avx2(const RowArgs<T>& r, const T* s, const T* table, int64_t slots, T* weights,
                                   T* value, T* negatives, T* e, T& loss, T& nonzero) {
    forward_row_impl<T, Pair, Smooth>(r, s, table, slots, weights, value, negatives, e, loss, nonzero);
  }
  static T ds(const RowArgs<T>& r, T* s, const T* table, const T* weights, int64_t slots, const int64_t* rank, T g,
              T* dv, T* negatives, T* slope, int64_t* at) {
    return ds_row_impl<T, Pair, Smooth>(r, s, table, weights, slots, rank, g, dv, negatives, slope, at);
  }
  MK_AVX2 static T ds_avx2(const RowArgs<T>& r, T* s, const T* table, const T* weights, int64_t slots,
                           const int64_t* rank, T g, T* dv, T* negatives, T* slope, int64_t* at) {
    return ds_row_impl<T, Pair, Smooth>(r, s, table, weights, slots, rank, g, dv, negatives, slope, at);
  }
};

template <typename T>
struct RowFns {
  ForwardRowFn<T> forward;
  DsRowFn<T> ds;
};

template <typename T, int Pair, bool Smooth>
RowFns<T> row_fns_for() {
  using K = RowKernels<T, Pair, Smooth>;
  return use_avx2() ? RowFns<T>{&K::forward_avx2, &K::ds_avx2} : RowFns<T>{&K::forward, &K::ds};
}

template <typename T, bool Smooth>
RowFns<T> row_fns_smooth(int pair) {
  if (pair == kSquaredEuclidean) return row_fns_for<T, kSquaredEuclidean, Smooth>();
  if (pair == kEuclidean) return row_fns_for<T, kEuclidean, Smooth>();
  return row_fns_for<T, kSimilarity, Smooth>();
}

template <typename T>
RowFns<T> row_fns(int pair, bool smooth) {
  return smooth ? row_fns_smooth<T, true>(pair) : row_fns_smooth<T, false>(pair);
}

// The triplets' dS of a tile, for pair_tiles.h's backward passes (a TileDs).
template <typename T>
struct TripletTileDs {
  struct Scratch {
    std::vector<T> dv, negatives, slope;
    std::vector<int64_t> at;
    explicit Scratch(int64_t cols) : dv(cols), negatives(cols), slope(cols), at(cols) {}
  };

  const TripletMarginBackwardParams<T>& b;
  DsRowFn<T> ds_row;

  Scratch scratch(int64_t cols) const { return Scratch(cols); }

  void operator()(Scratch& scratch, int64_t r0, int64_t rows, int64_t c0, int64_t cols, T* tile, int64_t ld,
                  T* sums) const {
    const PairRowsParams<T>& p = b.rows.pair;
    const int64_t width = b.slot_count;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t row = r0 + i;
      const T sum = ds_row(row_args(p, row, c0, cols), tile + i * ld, b.table + row * width, b.weights + row * width,
                           width, b.rank + c0, b.rows.grad[row], scratch.dv.data(), scratch.negatives.data(),
                           scratch.slope.data(), scratch.at.data());
      if (sums != nullptr) sums[i] += sum;
    }
  }
};

}  // namespace

template <typename T>
void triplet_margin_forward(const TripletMarginParams<T>& t, T* stats, T* table, T* weights) {
  const PairRowsParams<T>& p = t.pair;
  const int64_t width = t.slot_count;
  const RowFns<T> fns = row_fns<T>(p.pair_value, t.smooth);
#pragma omp parallel num_threads(p.num_threads)
  {
    std::vector<T> tile(kBlockRows * kBlockCols), value(kBlockCols), negatives(kBlockCols), e(kBlockCols);
    std::vector<T> loss(kBlockRows), nonzero(kBlockRows);
#pragma omp for schedule(static)
    for (int64_t block = 0; block < blocks(p.n, kBlockRows); ++block) {
      const int64_t r0 = block * kBlockRows, rows = std::min(kBlockRows, p.n - r0);
      T* block_table = table + r0 * width;
      T* block_weights = weights + r0 * width;
      std::fill(block_table, block_table + rows * width, -std::numeric_limits<T>::infinity());
      std::fill(block_weights, block_weights + rows * width, T(0));
      std::fill(loss.begin(), loss.end(), T(0));
      std::fill(nonzero.begin(), nonzero.end(), T(0));
      // The first sweep writes the block's tables whole before the second reads them: a negative meets every
      // positive of its anchor, whichever tile holds it.
      bool any = false;
      for (int64_t c0 = 0; c0 < p.m && width > 0; c0 += kBlockCols) {
        const int64_t cols = std::min(kBlockCols, p.m - c0);
        similarity_tile(p, r0, rows, c0, cols, tile.data());
        for (int64_t i = 0; i < rows; ++i) {
          const RowArgs<T> r = row_args(p, r0 + i, c0, cols);
          const T* s = tile.data() + i * cols;
          for (int64_t j = 0; j < cols; ++j) {
            if (j == r.self_col || r.y_labels[j] != r.x_label) continue;
            block_table[i * width + t.rank[c0 + j]] =
                p.a - pair_value(p.pair_value, s[j], r.x_sq, r.y_sq != nullptr ? r.y_sq[j] : T(0));
            any = true;
          }
        }
      }
      for (int64_t c0 = 0; c0 < p.m && any; c0 += kBlockCols) {
        const int64_t cols = std::min(kBlockCols, p.m - c0);
        similarity_tile(p, r0, rows, c0, cols, tile.data());
        for (int64_t i = 0; i < rows; ++i)
          fns.forward(row_args(p, r0 + i, c0, cols), tile.data() + i * cols, block_table + i * width, width,
                      block_weights + i * width, value.data(), negatives.data(), e.data(), loss[i], nonzero[i]);
      }
      for (int64_t i = 0; i < rows; ++i) {
        stats[r0 + i] = loss[i];
        stats[p.n + r0 + i] = nonzero[i];
      }
    }
  }
}

template <typename T>
void triplet_margin_backward(const TripletMarginBackwardParams<T>& b) {
  pair_rows_backward(b.rows, TripletTileDs<T>{b, row_fns<T>(b.rows.pair.pair_value, b.smooth).ds});
}

template void triplet_margin_forward<float>(const TripletMarginParams<float>&, float*, float*, float*);
template void triplet_margin_forward<double>(const TripletMarginParams<double>&, double*, double*, double*);
template void triplet_margin_backward<float>(const TripletMarginBackwardParams<float>&);
template void triplet_margin_backward<double>(const TripletMarginBackwardParams<double>&);

}  // namespace metric_kernels::cpu
