// Per-loss math of the fused engine, shared by the CPU and CUDA kernels (and mirrored by the Triton kernels):
// what a pair contributes (its pair value) and its derivative, which pairs a loss folds, its logits and their
// derivatives, the online logsumexp, and dS of one tile entry.
//
// Every loss is a row reduction over a masked matrix of pair values v_ij, formed from the tile entry s_ij = x_i . y_j
// (pair_value below). For query row i the engine keeps four statistics (kStatRows):
//   stats[0][i] = logsumexp over mask1 of logit1(v_ij)   (Circle, Proxy-Anchor, Multi-Similarity: positives)
//   stats[1][i] = logsumexp over mask2 of logit2(v_ij)   (the same: negatives; SupCon: all pairs)
//   stats[2][i] = sum over positives of v_ij             (SupCon)
//   stats[3][i] = 0
// and the losses are cheap functions of these (metric_kernels/_row_epilogues.py). The losses PML reduces per pair
// keep per-query sums and nonzero counts instead:
//   NT-Xent (b = 1 / temperature; a = 0, or the angular margin of TupletMarginLoss, whose positives' logits are
//     b cos(acos(v_ij) - a), AngularMargin; written b v_ij below), two sweeps over the references: first
//     A_i = logsumexp over negatives of b v_ij (stats[1], as mask2 above), then over positives, with
//     x_ij = A_i - b v_ij (ntxent_positive):
//     stats[0] = sum of softplus(x_ij) (the query's pair losses), stats[2] = W_i = sum of sigmoid(x_ij) (what the
//     backward needs), stats[3] = how many pair losses are nonzero as PML rounds them;
//   Contrastive (a, b: the margins in pair-value form), one sweep (contrastive_pair): stats[0] = sum over positives
//     of relu(a - v_ij), stats[1] = sum over negatives of relu(v_ij - b), stats[2] and stats[3]: how many of each
//     are nonzero.
// The counts and W are never differentiated: the backward ignores their upstream gradients.
// The triplet margin loss over every triplet (kTripletMargin, a = the margin; the CUDA kernels' kind, whose forward
// has ops of its own: metric_kernels/_fused.py) keeps a row of each anchor's positives instead, table[a, r] =
// margin - v_ap, and its backward's dS reads that row and the forward's weights (triplet_margin_dv).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define MK_HD __host__ __device__ __forceinline__
#else
#define MK_HD inline
#endif

#if defined(METRIC_KERNELS_HOST_EMULATION)
#include "cuda/host_emulation.h"
#endif

namespace metric_kernels {

enum LossKind : int {
  kCircle = 0,
  kSupCon = 1,
  kProxyAnchor = 2,
  kMultiSimilarity = 3,
  kNTXent = 4,
  kContrastive = 5,
  kTripletMargin = 6
};

constexpr int kStatRows = 4;  // statistics per query row

// What a pair contributes (metric_kernels/_pairs.py), from s = x_i . y_j and the squared row norms of the rows as
// given: s itself, or minus the squared or plain Euclidean distance, with q = |x_i|^2 + |y_j|^2 - 2 s clamped at 0.
enum PairValue : int { kSimilarity = 0, kSquaredEuclidean = 1, kEuclidean = 2 };

// Under the host emulation of the CUDA kernels the math below counts its exponentials (its work counters; the tests
// pin one per pair per pass). Those translation units see it in an inline namespace of their own, so that the
// counting and the plain bodies are distinct functions, each with one definition, where both are linked into _C.
#if defined(METRIC_KERNELS_HOST_EMULATION)
inline namespace counted_exponentials {
#else
inline namespace plain_exponentials {
#endif

template <typename T>
MK_HD T exponential(T x) {
#if defined(METRIC_KERNELS_HOST_EMULATION)
  host_emulation::count_work(host_emulation::Work::kExponentials, 1);
#endif
  return std::exp(x);
}

template <typename T>
MK_HD T pair_value(int pair, T s, T x_sq, T y_sq) {
  if (pair == kSimilarity) return s;
  const T q = x_sq + y_sq - 2 * s;
  const T clamped = q > 0 ? q : T(0);
  return pair == kSquaredEuclidean ? -clamped : -std::sqrt(clamped);
}

// dL/ds of a pair from G = dL/dv (v its pair value). The distances go through W = dL/dq: -G (squared), G / (2 v)
// (plain), 0 where q clamps or the distance is 0 (v = 0, as torch.cdist's gradient); then dL/ds = -2 W.
template <typename T>
MK_HD T pair_slope(int pair, T gradient, T v) {
  if (pair == kSimilarity) return gradient;
  if (v >= 0) return T(0);
  return pair == kSquaredEuclidean ? 2 * gradient : -gradient / v;
}

// Whether the pair value depends on the row norms. q has the terms |x_i|^2 and |y_j|^2, so with dS = dL/ds the
// gradients are dX_i = sum_j dS_ij y_j + 2 (sum_j W_ij) x_i = sum_j dS_ij y_j - (sum_j dS_ij) x_i and likewise
// dY_j = sum_i dS_ij x_i - (sum_i dS_ij) y_j: the kernels add the products of dS and then the norm terms, minus each
// row's (column's) sum of dS times the row itself.
MK_HD bool has_norm_term(int pair) { return pair != kSimilarity; }

template <typename T>
struct Logits {
  T value1, slope1;  // logit of the first logsumexp and its derivative in the pair value
  T value2, slope2;  // the same for the second
};

// Circle: a = m, b = gamma, weights relu(.) treated as constants (the paper, PML). Proxy-Anchor: a = margin,
// b = alpha. Multi-Similarity: a = alpha, b = beta, unshifted (the shift by base is a per-row constant the Python
// layer adds to the statistics). SupCon and NT-Xent: b = 1 / temperature (NT-Xent's first sweep: the second
// logsumexp, over negatives). Contrastive has no logsumexp.
template <typename T>
MK_HD Logits<T> loss_logits(int kind, T v, T a, T b) {
  if (kind == kCircle) {
    const T w1 = b * (1 + a - v > 0 ? 1 + a - v : T(0));
    const T w2 = b * (v + a > 0 ? v + a : T(0));
    return {-w1 * (v - (1 - a)), -w1, w2 * (v - a), w2};
  }
  if (kind == kProxyAnchor) return {-b * (v - a), -b, b * (v + a), b};
  if (kind == kMultiSimilarity) return {-a * v, -a, b * v, b};
  if (kind == kContrastive) return {T(0), T(0), T(0), T(0)};
  return {v, T(0), v * b, b};
}

MK_HD bool in_first(int kind, bool positive) {
  return kind != kSupCon && kind != kNTXent && kind != kContrastive && positive;
}
MK_HD bool in_second(int kind, bool positive, bool negative) {
  return kind == kSupCon ? (positive || negative) : kind != kContrastive && negative;
}

// NT-Xent's positives with an angular margin a (radians; a != 0 is PML's TupletMarginLoss, on cosines v): the
// positive's logit is b cos(acos(v) - a) = b (v cos a + sqrt(1 - v^2) sin a) instead of b v. value(v) and its
// slope in v; a = 0 keeps v exactly (and any pair value, which need not lie in [-1, 1]). Where 1 - v^2 <= 0 (a
// parallel pair, or |v| just above 1 by rounding) the angle is 0 or pi: its term is 0 and so is its gradient, as
// torch.cdist's at distance 0 (PML's acos gives NaN there).
template <typename T>
struct AngularMargin {
  bool on;
  T cos_a, sin_a;
  // Every kind builds one (a = 0 but for NT-Xent's margin): the trigonometry only where it is used.
  MK_HD explicit AngularMargin(T a) : on(a != T(0)), cos_a(on ? std::cos(a) : T(1)), sin_a(on ? std::sin(a) : T(0)) {}
  MK_HD T value(T v) const {
    const T sine2 = (T(1) - v) * (T(1) + v);  // 1 - v is exact near v = 1
    return on ? v * cos_a + (sine2 > 0 ? std::sqrt(sine2) : T(0)) * sin_a : v;
  }
  MK_HD T slope(T v) const {
    const T sine2 = (T(1) - v) * (T(1) + v);  // 1 - v is exact near v = 1
    return on ? cos_a - (sine2 > 0 ? v * sin_a / std::sqrt(sine2) : T(0)) : T(1);
  }
  // |slope| for the pairs at least 0.9 degrees apart (|v| cot(angle) <= 64): what the 16-bit dS scaling assumes
  // (closer positives whose loss is not small may saturate their 16-bit dS entry).
  MK_HD T slope_bound() const { return on ? std::fabs(cos_a) + T(64) * std::fabs(sin_a) : T(1); }
};

// NT-Xent's second sweep: adds positive pair (i, j)'s loss softplus(x), x = A_i - b v_ij, to `loss`, sigmoid(x) to
// `weight` and 1 to `nonzero` where PML's loss is not exactly 0 (its ratio exp(b v) / (exp(b v) + exp(A)) rounds to
// 1 when 1 + exp(x) does, in the statistics' type); one exponential. A_i = -inf (no negative) adds nothing.
template <typename T>
MK_HD void ntxent_positive(T excess, T& loss, T& weight, T& nonzero) {
  const T e = exponential(-std::fabs(excess));
  const bool above = excess > 0;
  loss += (above ? excess : T(0)) + std::log1p(e);
  weight += (above ? T(1) : e) / (T(1) + e);
  nonzero += (above || T(1) + e > T(1)) ? T(1) : T(0);
}

// Contrastive: a pair's hinge, relu(a - v) for a positive, relu(v - b) for a negative, 0 otherwise.
template <typename T>
MK_HD T contrastive_hinge(T v, T a, T b, bool positive, bool negative) {
  const T h = positive ? a - v : (negative ? v - b : T(0));
  return h > 0 ? h : T(0);
}

// The triplet margin loss of a triplet (a, p, n) from its violation z = v_an - v_ap + margin: f(z) = relu(z), or with
// `smooth` softplus(z), and its slope f'(z), by torch's own formulas (the reference's, so that a triplet's loss and
// whether it counts as nonzero agree to rounding): relu keeps a NaN and its slope is [z > 0]; the softplus is
// log1p(exp(z)), z itself above 20, its slope exp(z) / (exp(z) + 1), 1 above 20 (torch's threshold). One exponential
// with `smooth`, none otherwise.
template <typename T>
struct TripletTerm {
  T loss, slope;
};

template <typename T>
MK_HD TripletTerm<T> triplet_margin_term(T z, bool smooth) {
  if (!smooth) return {z <= 0 ? T(0) : z, z > 0 ? T(1) : T(0)};
  if (z > T(20)) return {z, T(1)};
  const T e = exponential(z);
  return {std::log1p(e), e / (e + T(1))};
}

// f'(z) alone (the backward's): the softplus's log1p is not formed.
template <typename T>
MK_HD T triplet_margin_slope(T z, bool smooth) {
  if (!smooth) return z > 0 ? T(1) : T(0);
  if (z > T(20)) return T(1);
  const T e = exponential(z);
  return e / (e + T(1));
}

// dL/dv of pair (a, j), L = sum_a g_a stats[0, a], from the anchor's rows of the forward's table and weights (`slots`
// entries each): -g weights[rank] for a positive (rank: j's slot; the forward summed its triplets' slopes there),
// g times the sum of f'(v + table[r]) over the slots that hold a positive for a negative. A slot at -inf is skipped
// rather than added: with a NaN or infinite v it would give NaN where the anchor has no triplet. A rank outside the
// table (only a rank that is not _pairs.positive_slots') reads nothing.
template <typename T>
MK_HD T triplet_margin_dv(T v, bool positive, bool negative, bool smooth, T g, const T* table, const T* weights,
                          int64_t slots, int64_t rank) {
  if (positive) return rank >= 0 && rank < slots ? -g * weights[rank] : T(0);
  if (!negative) return T(0);
  T slope = 0;
  for (int64_t r = 0; r < slots; ++r) {
    const T t = table[r];
    if (t != -std::numeric_limits<T>::infinity()) slope += triplet_margin_slope(v + t, smooth);
  }
  return g * slope;
}

// (positive, negative) for query row i and reference j; the pair (i, i + self_offset) is neither
// (self_offset < 0: no query is a reference).
MK_HD void pair_kind(int64_t xl, int64_t yl, int64_t i, int64_t j, int64_t self_offset, bool& positive,
                     bool& negative) {
  const bool allowed = self_offset < 0 || j != i + self_offset;
  positive = allowed && xl == yl;
  negative = allowed && xl != yl;
}

// Online logsumexp: max and sum of exp(v - max). An empty row keeps max = -inf, sum = 0 and finishes at -inf.
template <typename T>
struct OnlineLse {
  T max = -std::numeric_limits<T>::infinity();
  T sum = 0;
  MK_HD void add(T v) {
    if (v > max) {
      sum = sum * exponential(max - v) + T(1);  // exp(-inf) = 0 for the first value
      max = v;
    } else {
      sum += exponential(v - max);
    }
  }
  // Folds in another partial state (the same row's other columns), as if its values had been added here.
  MK_HD void merge(T other_max, T other_sum) {
    if (other_sum == T(0)) return;
    if (sum == T(0)) {
      max = other_max, sum = other_sum;
      return;
    }
    const T top = max > other_max ? max : other_max;
    sum = sum * exponential(max - top) + other_sum * exponential(other_max - top);
    max = top;
  }
  MK_HD T finish() const { return sum > 0 ? max + std::log(sum) : -std::numeric_limits<T>::infinity(); }
};

// The derivative of g1 * stats[0]_i + g2 * stats[1]_i + g3 * stats[2]_i in the pair value v_ij (lse1, lse2, aux:
// the row's stats[0..2]). NT-Xent: g1 weighs the pair losses and g2 A_i, which the losses depend on through W_i
// (aux): dA = g2 + g1 W_i, one exponential per pair. Contrastive: the hinges' slopes.
// margin: AngularMargin(a), which the caller builds once (NT-Xent's a is its positives' angular margin).
template <typename T>
MK_HD T dv_entry(int kind, T v, T a, T b, const AngularMargin<T>& margin, bool positive, bool negative, T g1, T g2,
                 T g3, T lse1, T lse2, T aux) {
  if (kind == kNTXent) {
    const T e = exponential(b * (positive ? margin.value(v) : v) - lse2);
    return positive ? -b * g1 * margin.slope(v) / (T(1) + e) : (negative ? b * (g2 + g1 * aux) * e : T(0));
  }
  if (kind == kContrastive) {
    if (positive) return a - v > 0 ? -g1 : T(0);
    return negative && v - b > 0 ? g2 : T(0);
  }
  const Logits<T> l = loss_logits(kind, v, a, b);
  T dv = 0;
  if (in_first(kind, positive)) dv += g1 * exponential(l.value1 - lse1) * l.slope1;
  if (in_second(kind, positive, negative)) dv += g2 * exponential(l.value2 - lse2) * l.slope2;
  if (kind == kSupCon && positive) dv += g3;
  return dv;
}

// dS_ij: the same derivative in s_ij = x_i . y_j (x_sq, y_sq: the rows' squared norms, unused by the similarity).
template <typename T>
MK_HD T ds_entry(int kind, int pair, T s, T x_sq, T y_sq, T a, T b, const AngularMargin<T>& margin, bool positive,
                 bool negative, T g1, T g2, T g3, T lse1, T lse2, T aux) {
  const T v = pair_value(pair, s, x_sq, y_sq);
  return pair_slope(pair, dv_entry(kind, v, a, b, margin, positive, negative, g1, g2, g3, lse1, lse2, aux), v);
}

}  // inline namespace
}  // namespace metric_kernels
