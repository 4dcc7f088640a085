// Per-loss math of the fused engine, shared by the CPU and CUDA kernels (and mirrored by the Triton kernels):
// which pairs a loss folds, its logits and their derivatives in s, the online logsumexp, and dS of one tile entry.
//
// Every loss is a row reduction over a masked similarity matrix. For query row i the engine keeps
//   stats[0][i] = logsumexp over mask1 of logit1(s_ij)   (Circle, Proxy-Anchor: positives)
//   stats[1][i] = logsumexp over mask2 of logit2(s_ij)   (Circle, Proxy-Anchor: negatives; SupCon: all pairs)
//   stats[2][i] = sum over positives of s_ij             (SupCon)
// and the losses are cheap functions of these (metric_kernels/_row_epilogues.py).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define MK_HD __host__ __device__ __forceinline__
#else
#define MK_HD inline
#endif

namespace metric_kernels {

enum LossKind : int { kCircle = 0, kSupCon = 1, kProxyAnchor = 2 };

template <typename T>
struct Logits {
  T value1, slope1;  // logit of the first logsumexp and its derivative in s
  T value2, slope2;  // the same for the second
};

// Circle: a = m, b = gamma, weights relu(.) treated as constants (the paper, PML). Proxy-Anchor: a = margin,
// b = alpha. SupCon: b = 1 / temperature.
template <typename T>
MK_HD Logits<T> loss_logits(int kind, T s, T a, T b) {
  if (kind == kCircle) {
    const T w1 = b * (1 + a - s > 0 ? 1 + a - s : T(0));
    const T w2 = b * (s + a > 0 ? s + a : T(0));
    return {-w1 * (s - (1 - a)), -w1, w2 * (s - a), w2};
  }
  if (kind == kProxyAnchor) return {-b * (s - a), -b, b * (s + a), b};
  return {s, T(0), s * b, b};
}

MK_HD bool in_first(int kind, bool positive) { return kind != kSupCon && positive; }
MK_HD bool in_second(int kind, bool positive, bool negative) {
  return kind == kSupCon ? (positive || negative) : negative;
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
      sum = sum * std::exp(max - v) + T(1);  // exp(-inf) = 0 for the first value
      max = v;
    } else {
      sum += std::exp(v - max);
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
    sum = sum * std::exp(max - top) + other_sum * std::exp(other_max - top);
    max = top;
  }
  MK_HD T finish() const { return sum > 0 ? max + std::log(sum) : -std::numeric_limits<T>::infinity(); }
};

// dS_ij: the derivative of g1 * lse1_i + g2 * lse2_i + g3 * lin_i in s_ij.
template <typename T>
MK_HD T ds_entry(int kind, T s, T a, T b, bool positive, bool negative, T g1, T g2, T g3, T lse1, T lse2) {
  const Logits<T> l = loss_logits(kind, s, a, b);
  T ds = 0;
  if (in_first(kind, positive)) ds += g1 * std::exp(l.value1 - lse1) * l.slope1;
  if (in_second(kind, positive, negative)) ds += g2 * std::exp(l.value2 - lse2) * l.slope2;
  if (kind == kSupCon && positive) ds += g3;
  return ds;
}

}  // namespace metric_kernels
