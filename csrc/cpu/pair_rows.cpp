#include "pair_rows.h"

#include <algorithm>
#include <limits>
#include <vector>

#include "../epilogue.h"
#include "pair_tiles.h"
#include "tiling.h"
#include "vec_exp.h"

namespace metric_kernels::cpu {
namespace {

// Folds a tile row's partial logsumexp (its max `top` and its sum of exp(logit - top)) into a row's online state;
// `bad`: a NaN logit was seen (it poisons the state, as OnlineLse::add would).
template <typename T>
inline void fold(T top, T sum, bool bad, OnlineLse<T>& state) {
  if (bad) {
    state.merge(top, std::numeric_limits<T>::quiet_NaN());
  } else if (top != -std::numeric_limits<T>::infinity()) {  // else nothing of this logsumexp in the tile row
    state.merge(top, sum);
  }
}

// One tile row of the forward. A pair is in at most one of Circle's and Proxy-Anchor's two logsumexps, SupCon has
// one: the first loop writes each pair's one logit (-inf: in neither) and which logsumexp it is in, and takes the
// maxima; the second takes one exponential per pair, against its logsumexp's max.
template <typename T, int Kind, int Pair>
inline __attribute__((always_inline)) void forward_row_impl(const RowArgs<T>& r, const T* s, T* logit, T* in1,
                                                            OnlineLse<T>& first, OnlineLse<T>& second, T& linear) {
  constexpr T kInf = std::numeric_limits<T>::infinity();
  T top1 = -kInf, top2 = -kInf, lin = 0;
  T bad1 = 0, bad2 = 0;  // NaN logits seen (counted in T: every reduction of the loop has one vector type)
#pragma omp simd reduction(max : top1, top2) reduction(+ : lin, bad1, bad2)
  for (int64_t j = 0; j < r.cols; ++j) {
    const bool allowed = j != r.self_col, same = r.y_labels[j] == r.x_label;
    const bool positive = allowed && same, negative = allowed && !same;
    const T v = pair_value(Pair, s[j], r.x_sq, Pair == kSimilarity ? T(0) : r.y_sq[j]);
    const Logits<T> l = loss_logits(Kind, v, r.a, r.b);
    const bool one = in_first(Kind, positive), two = in_second(Kind, positive, negative);
    const T v1 = one ? l.value1 : -kInf, v2 = two ? l.value2 : -kInf;
    logit[j] = one ? v1 : v2;
    if constexpr (Kind != kSupCon) in1[j] = one ? T(1) : T(0);
    top1 = v1 > top1 ? v1 : top1;
    top2 = v2 > top2 ? v2 : top2;
    bad1 += v1 != v1 ? T(1) : T(0);
    bad2 += v2 != v2 ? T(1) : T(0);
    if constexpr (Kind == kSupCon) lin += positive ? v : T(0);
  }
  // A logsumexp without entries here has max -inf; its pairs' logits are then -inf too: shift them by 0.
  const T shift1 = top1 == -kInf ? T(0) : top1, shift2 = top2 == -kInf ? T(0) : top2;
  if constexpr (Kind == kSupCon) {
#pragma omp simd
    for (int64_t j = 0; j < r.cols; ++j) logit[j] = vexp(logit[j] - shift2);
    fold(top2, lane_sum(logit, r.cols), bad2 != 0, second);
    linear += lin;
  } else {
#pragma omp simd
    for (int64_t j = 0; j < r.cols; ++j) {
      const bool one = in1[j] != T(0);
      const T e = vexp(logit[j] - (one ? shift1 : shift2));
      in1[j] = one ? e : T(0);
      logit[j] = one ? T(0) : e;
    }
    fold(top1, lane_sum(in1, r.cols), bad1 != 0, first);
    fold(top2, lane_sum(logit, r.cols), bad2 != 0, second);
  }
}

// Per-query sums of the losses reduced per pair (epilogue.h): Contrastive's hinges and counts in one sweep;
// NT-Xent's second sweep over the positives, with A = the row's logsumexp over its negatives from the first.
template <typename T>
struct PairSums {
  T first = 0, second = 0, third = 0, fourth = 0;  // stats[0 .. 3] (NT-Xent's stats[1] is its logsumexp instead)
};

template <typename T, int Pair>
inline __attribute__((always_inline)) void contrastive_row_impl(const RowArgs<T>& r, const T* s, PairSums<T>& out) {
  T positive_sum = 0, negative_sum = 0, positive_count = 0, negative_count = 0;
#pragma omp simd reduction(+ : positive_sum, negative_sum, positive_count, negative_count)
  for (int64_t j = 0; j < r.cols; ++j) {
    const bool allowed = j != r.self_col, same = r.y_labels[j] == r.x_label;
    const bool positive = allowed && same, negative = allowed && !same;
    const T v = pair_value(Pair, s[j], r.x_sq, Pair == kSimilarity ? T(0) : r.y_sq[j]);
    const T h = contrastive_hinge(v, r.a, r.b, positive, negative);
    positive_sum += positive ? h : T(0);
    negative_sum += negative ? h : T(0);
    positive_count += positive && h > 0 ? T(1) : T(0);
    negative_count += negative && h > 0 ? T(1) : T(0);
  }
  out.first += positive_sum, out.second += negative_sum, out.third += positive_count, out.fourth += negative_count;
}

template <typename T, int Pair>
inline __attribute__((always_inline)) void ntxent_row_impl(const RowArgs<T>& r, const T* s, T lse, PairSums<T>& out) {
  T loss = 0, weight = 0, nonzero = 0;
  const AngularMargin<T> margin(r.a);
  for (int64_t j = 0; j < r.cols; ++j) {
    if (j == r.self_col || r.y_labels[j] != r.x_label) continue;
    const T v = pair_value(Pair, s[j], r.x_sq, Pair == kSimilarity ? T(0) : r.y_sq[j]);
    ntxent_positive(lse - r.b * margin.value(v), loss, weight, nonzero);
  }
  out.first += loss, out.third += weight, out.fourth += nonzero;
}

// s[cols] in: the similarities; out: dS (epilogue.h's ds_entry, one exponential per pair). Returns the row's sum
// of dS where the pair value has a norm term (0 otherwise). arg, coef, extra: cols entries of scratch.
template <typename T, int Kind, int Pair>
inline __attribute__((always_inline)) T ds_row_impl(const RowArgs<T>& r, T* s, T* arg, T* coef, T* extra, T g1,
                                                    T g2, T g3, T lse1, T lse2, T aux) {
  constexpr T kInf = std::numeric_limits<T>::infinity();
  const AngularMargin<T> margin(Kind == kNTXent ? r.a : T(0));
#pragma omp simd
  for (int64_t j = 0; j < r.cols; ++j) {
    const bool allowed = j != r.self_col, same = r.y_labels[j] == r.x_label;
    const bool positive = allowed && same, negative = allowed && !same;
    const T v = pair_value(Pair, s[j], r.x_sq, Pair == kSimilarity ? T(0) : r.y_sq[j]);
    const Logits<T> l = loss_logits(Kind, v, r.a, r.b);
    // A pair is in at most one logsumexp of Circle and Proxy-Anchor (positives, negatives) and SupCon has one.
    if constexpr (Kind == kNTXent) {
      // epilogue.h's dv_entry: exp(b v - A) for both kinds of pair (a positive's v through its angular margin); a
      // positive takes -b g1 v' / (1 + it)
      arg[j] = allowed ? r.b * (positive ? margin.value(v) : v) - lse2 : -kInf;
      coef[j] = positive ? -r.b * g1 * margin.slope(v) : (negative ? r.b * (g2 + g1 * aux) : T(0));
      extra[j] = positive ? T(1) : T(0);
    } else if constexpr (Kind == kContrastive) {
      coef[j] = positive ? (r.a - v > 0 ? -g1 : T(0)) : (negative && v - r.b > 0 ? g2 : T(0));
    } else if constexpr (Kind == kSupCon) {
      arg[j] = allowed ? l.value2 - lse2 : -kInf;
      coef[j] = allowed ? g2 * l.slope2 : T(0);
      extra[j] = positive ? g3 : T(0);
    } else {
      arg[j] = positive ? l.value1 - lse1 : (negative ? l.value2 - lse2 : -kInf);
      coef[j] = positive ? g1 * l.slope1 : (negative ? g2 * l.slope2 : T(0));
    }
    if constexpr (Pair != kSimilarity) s[j] = v;
  }
  const auto ds_entry = [&](int64_t j) {
    T dv;
    if constexpr (Kind == kContrastive) {
      dv = coef[j];
    } else if constexpr (Kind == kNTXent) {
      const T e = vexp(arg[j]);
      dv = extra[j] != T(0) ? coef[j] / (T(1) + e) : coef[j] * e;
    } else {
      dv = coef[j] * vexp(arg[j]);
      if constexpr (Kind == kSupCon) dv += extra[j];
    }
    return pair_slope(Pair, dv, s[j]);
  };
  T sum = 0;
  if constexpr (Pair == kSimilarity) {
#pragma omp simd
    for (int64_t j = 0; j < r.cols; ++j) s[j] = ds_entry(j);
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < r.cols; ++j) {
      const T ds = ds_entry(j);
      s[j] = ds;
      sum += ds;
    }
  }
  return sum;
}

template <typename T>
using ForwardRowFn = void (*)(const RowArgs<T>&, const T*, T*, T*, OnlineLse<T>&, OnlineLse<T>&, T&);
template <typename T>
using DsRowFn = T (*)(const RowArgs<T>&, T*, T*, T*, T*, T, T, T, T, T, T);
template <typename T>
using ContrastiveRowFn = void (*)(const RowArgs<T>&, const T*, PairSums<T>&);
template <typename T>
using NTXentRowFn = void (*)(const RowArgs<T>&, const T*, T, PairSums<T>&);

template <typename T, int Kind, int Pair>
struct RowKernels {
  static void forward(const RowArgs<T>& r, const T* s, T* logit, T* in1, OnlineLse<T>& first,
                      OnlineLse<T>& second, T& linear) {
    forward_row_impl<T, Kind, Pair>(r, s, logit, in1, first, second, linear);
  }
  MK_AVX2 static void forward_avx2(const RowArgs<T>& r, const T* s, T* logit, T* in1, OnlineLse<T>& first,
                                   OnlineLse<T>& second, T& linear) {
    forward_row_impl<T, Kind, Pair>(r, s, logit, in1, first, second, linear);
  }
  static T ds(const RowArgs<T>& r, T* s, T* arg, T* coef, T* extra, T g1, T g2, T g3, T lse1, T lse2, T aux) {
    return ds_row_impl<T, Kind, Pair>(r, s, arg, coef, extra, g1, g2, g3, lse1, lse2, aux);
  }
  MK_AVX2 static T ds_avx2(const RowArgs<T>& r, T* s, T* arg, T* coef, T* extra, T g1, T g2, T g3, T lse1,
                           T lse2, T aux) {
    return ds_row_impl<T, Kind, Pair>(r, s, arg, coef, extra, g1, g2, g3, lse1, lse2, aux);
  }
  static void contrastive(const RowArgs<T>& r, const T* s, PairSums<T>& out) {
    contrastive_row_impl<T, Pair>(r, s, out);
  }
  MK_AVX2 static void contrastive_avx2(const RowArgs<T>& r, const T* s, PairSums<T>& out) {
    contrastive_row_impl<T, Pair>(r, s, out);
  }
  static void ntxent(const RowArgs<T>& r, const T* s, T lse, PairSums<T>& out) {
    ntxent_row_impl<T, Pair>(r, s, lse, out);
  }
  MK_AVX2 static void ntxent_avx2(const RowArgs<T>& r, const T* s, T lse, PairSums<T>& out) {
    ntxent_row_impl<T, Pair>(r, s, lse, out);
  }
};

template <typename T>
struct RowFns {
  ForwardRowFn<T> forward;
  DsRowFn<T> ds;
  ContrastiveRowFn<T> contrastive;  // the per-pair sums of Contrastive and of NT-Xent's second sweep
  NTXentRowFn<T> ntxent;
};

template <typename T, int Kind, int Pair>
RowFns<T> row_fns_for() {
  using K = RowKernels<T, Kind, Pair>;
  return use_avx2() ? RowFns<T>{&K::forward_avx2, &K::ds_avx2, &K::contrastive_avx2, &K::ntxent_avx2}
                    : RowFns<T>{&K::forward, &K::ds, &K::contrastive, &K::ntxent};
}

template <typename T, int Kind>
RowFns<T> row_fns_kind(int pair) {
  if (pair == kSquaredEuclidean) return row_fns_for<T, Kind, kSquaredEuclidean>();
  if (pair == kEuclidean) return row_fns_for<T, Kind, kEuclidean>();
  return row_fns_for<T, Kind, kSimilarity>();
}

template <typename T>
RowFns<T> row_fns(int kind, int pair) {
  if (kind == kSupCon) return row_fns_kind<T, kSupCon>(pair);
  if (kind == kProxyAnchor) return row_fns_kind<T, kProxyAnchor>(pair);
  if (kind == kMultiSimilarity) return row_fns_kind<T, kMultiSimilarity>(pair);
  if (kind == kNTXent) return row_fns_kind<T, kNTXent>(pair);
  if (kind == kContrastive) return row_fns_kind<T, kContrastive>(pair);
  return row_fns_kind<T, kCircle>(pair);
}

// The log-sum-exp kinds' dS of a tile, for pair_tiles.h's backward passes (a TileDs): ds_row per row, from the
// row's upstream gradients and saved statistics.
template <typename T>
struct LseTileDs {
  // Per-thread scratch of the dS rows: cols entries each.
  struct Scratch {
    std::vector<T> arg, coef, extra;
    explicit Scratch(int64_t cols) : arg(cols), coef(cols), extra(cols) {}
  };

  const PairRowsBackwardParams<T>& b;
  DsRowFn<T> ds_row;

  Scratch scratch(int64_t cols) const { return Scratch(cols); }

  void operator()(Scratch& scratch, int64_t r0, int64_t rows, int64_t c0, int64_t cols, T* tile, int64_t ld,
                  T* sums) const {
    const PairRowsParams<T>& p = b.pair;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t row = r0 + i;
      const T sum = ds_row(row_args(p, row, c0, cols), tile + i * ld, scratch.arg.data(), scratch.coef.data(),
                           scratch.extra.data(), b.grad[row], b.grad[p.n + row], b.grad[2 * p.n + row],
                           b.stats[row], b.stats[p.n + row], b.stats[2 * p.n + row]);
      if (sums != nullptr) sums[i] += sum;
    }
  }
};

}  // namespace

template <typename T>
void lse_rows_forward(const PairRowsParams<T>& p, T* stats) {
  const RowFns<T> fns = row_fns<T>(p.kind, p.pair_value);
#pragma omp parallel num_threads(p.num_threads)
  {
    std::vector<T> tile(kBlockRows * kBlockCols), logit(kBlockCols), in1(kBlockCols);
    std::vector<OnlineLse<T>> first(kBlockRows), second(kBlockRows);
    std::vector<T> linear(kBlockRows);
    std::vector<PairSums<T>> sums(kBlockRows);
#pragma omp for schedule(static)
    for (int64_t block = 0; block < blocks(p.n, kBlockRows); ++block) {
      const int64_t r0 = block * kBlockRows, rows = std::min(kBlockRows, p.n - r0);
      std::fill(first.begin(), first.end(), OnlineLse<T>{});
      std::fill(second.begin(), second.end(), OnlineLse<T>{});
      std::fill(linear.begin(), linear.end(), T(0));
      std::fill(sums.begin(), sums.end(), PairSums<T>{});
      for (int64_t c0 = 0; c0 < p.m; c0 += kBlockCols) {
        const int64_t cols = std::min(kBlockCols, p.m - c0);
        similarity_tile(p, r0, rows, c0, cols, tile.data());
        for (int64_t i = 0; i < rows; ++i) {
          const RowArgs<T> r = row_args(p, r0 + i, c0, cols);
          if (p.kind == kContrastive) {
            fns.contrastive(r, tile.data() + i * cols, sums[i]);
          } else {
            fns.forward(r, tile.data() + i * cols, logit.data(), in1.data(), first[i], second[i], linear[i]);
          }
        }
      }
      if (p.kind == kNTXent) {  // the second sweep, over the positives, with each row's A known
        for (int64_t c0 = 0; c0 < p.m; c0 += kBlockCols) {
          const int64_t cols = std::min(kBlockCols, p.m - c0);
          similarity_tile(p, r0, rows, c0, cols, tile.data());
          for (int64_t i = 0; i < rows; ++i)
            fns.ntxent(row_args(p, r0 + i, c0, cols), tile.data() + i * cols, second[i].finish(), sums[i]);
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        T* out = stats + r0 + i;
        if (p.kind == kContrastive || p.kind == kNTXent) {
          out[0] = sums[i].first;
          out[p.n] = p.kind == kNTXent ? second[i].finish() : sums[i].second;
          out[2 * p.n] = sums[i].third;
          out[3 * p.n] = sums[i].fourth;
        } else {
          out[0] = first[i].finish();
          out[p.n] = second[i].finish();
          out[2 * p.n] = linear[i];
          out[3 * p.n] = T(0);
        }
      }
    }
  }
}

template <typename T>
void lse_rows_backward(const PairRowsBackwardParams<T>& b) {
  pair_rows_backward(b, LseTileDs<T>{b, row_fns<T>(b.pair.kind, b.pair.pair_value).ds});
}

template <typename T>
void batch_hard_select(const PairRowsParams<T>& p, int64_t* choices) {
#pragma omp parallel num_threads(p.num_threads)
  {
    std::vector<T> tile(kBlockRows * kBlockCols);
#pragma omp for schedule(static)
    for (int64_t block = 0; block < blocks(p.n, kBlockRows); ++block) {
      const int64_t r0 = block * kBlockRows, rows = std::min(kBlockRows, p.n - r0);
      std::vector<T> far(rows, -std::numeric_limits<T>::infinity()), near(rows, std::numeric_limits<T>::infinity());
      std::vector<int64_t> far_at(rows, -1), near_at(rows, -1);
      for (int64_t c0 = 0; c0 < p.m; c0 += kBlockCols) {
        const int64_t cols = std::min(kBlockCols, p.m - c0);
        similarity_tile(p, r0, rows, c0, cols, tile.data());
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t row = r0 + i;
          for (int64_t j = 0; j < cols; ++j) {
            bool positive, negative;
            pair_kind(p.x_labels[row], p.y_labels[c0 + j], row, c0 + j, p.self_offset, positive, negative);
            const T squared = p.x_sq[row] + p.y_sq[c0 + j] - 2 * tile[i * cols + j];
            if (positive && squared > far[i]) far[i] = squared, far_at[i] = c0 + j;
            if (negative && squared < near[i]) near[i] = squared, near_at[i] = c0 + j;
          }
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        choices[r0 + i] = far_at[i];
        choices[p.n + r0 + i] = near_at[i];
      }
    }
  }
}

template void lse_rows_forward<float>(const PairRowsParams<float>&, float*);
template void lse_rows_forward<double>(const PairRowsParams<double>&, double*);
template void lse_rows_backward<float>(const PairRowsBackwardParams<float>&);
template void lse_rows_backward<double>(const PairRowsBackwardParams<double>&);
template void batch_hard_select<float>(const PairRowsParams<float>&, int64_t*);
template void batch_hard_select<double>(const PairRowsParams<double>&, int64_t*);

}  // namespace metric_kernels::cpu
