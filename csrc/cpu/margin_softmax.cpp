#include "margin_softmax.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../epilogue.h"
#include "tiling.h"
#include "vec_exp.h"

// Cosines come from raw products and inverse norms, cos_ij = (x_i . w_j) rx_i rw_j, so neither X nor W is copied or
// normalised; the backward applies the normalisation's Jacobian through two per-row (per-column) sums of dS * cos:
//   dx_i = rx_i sum_j dS_ij rw_j w_j - rx_i^2 (sum_j dS_ij cos_ij) x_i     (the second term only where |x_i| > eps)
// and the same for each column w_j with the roles swapped. A class's cosine is the largest of its sub-centres', so
// its dS lands on that one column. A side left raw (MarginSoftmaxParams::normalize_x / normalize_w false:
// SphereFace's rows, LargeMarginSoftmax's rows and columns) has r = 1 and no second term: its "cosine" is the product
// with the other side's unit vectors.
namespace metric_kernels::cpu {
namespace {

constexpr int64_t kBlockRows = 64;
constexpr int64_t kTileColumns = 256;  // columns of W per tile, rounded down to whole classes
// Row blocks x class splits the forward and the dX pass aim at: enough tasks for a small batch on many threads,
// and a fixed number, so that the result does not depend on how many threads run.
constexpr int64_t kTargetTasks = 32;

template <typename T>
constexpr T kNormEps = T(1e-12);  // F.normalize's eps: rows are divided by max(|row|, eps)

template <typename T>
constexpr T kInf = std::numeric_limits<T>::infinity();

// The tiles of one problem and the forward's task grid.
struct Grid {
  int64_t tile_classes, class_tiles, row_blocks, splits, tiles_per_split;
};

template <typename T>
Grid make_grid(const MarginSoftmaxParams<T>& p) {
  Grid g{};
  g.tile_classes = std::max<int64_t>(1, kTileColumns / p.sub_centers);
  g.class_tiles = blocks(p.classes, g.tile_classes);
  g.row_blocks = blocks(p.n, kBlockRows);
  const int64_t wanted = std::clamp<int64_t>(blocks(kTargetTasks, std::max<int64_t>(g.row_blocks, 1)), 1,
                                             std::max<int64_t>(g.class_tiles, 1));
  g.tiles_per_split = blocks(g.class_tiles, wanted);
  g.splits = std::max<int64_t>(1, blocks(g.class_tiles, std::max<int64_t>(g.tiles_per_split, 1)));
  return g;
}

// The class tiles of split `split`: [first, last).
struct TileRange {
  int64_t first, last;
};

inline TileRange split_tiles(const Grid& g, int64_t split) {
  const int64_t first = split * g.tiles_per_split;
  return {first, std::min(g.class_tiles, first + g.tiles_per_split)};
}

// Task `task` of the forward's and the dX pass's grid (row blocks x class splits): its split, first row and rows.
struct RowTask {
  int64_t split, r0, rows;
};

template <typename T>
RowTask row_task(const MarginSoftmaxParams<T>& p, const Grid& g, int64_t task) {
  const int64_t r0 = task / g.splits * kBlockRows;
  return {task % g.splits, r0, std::min(kBlockRows, p.n - r0)};
}

// Class tile t: its first class, class count, first column and column count.
struct ClassTile {
  int64_t c0, classes, j0, cols;
};

template <typename T>
ClassTile class_tile(const MarginSoftmaxParams<T>& p, const Grid& g, int64_t t) {
  const int64_t c0 = t * g.tile_classes, classes = std::min(g.tile_classes, p.classes - c0);
  return {c0, classes, c0 * p.sub_centers, classes * p.sub_centers};
}

template <typename T>
T inverse_norm(T squared) {
  return T(1) / std::max(std::sqrt(squared), kNormEps<T>);
}

// Whether a row (column) has the normalisation's Jacobian term: not where it is left raw, nor where its norm is
// clamped at eps (the normalisation is then a plain division).
template <typename T>
bool radial(T inverse, bool normalized) {
  return normalized && inverse < T(1) / kNormEps<T>;
}

template <typename T>
void inverse_row_norms(const MarginSoftmaxParams<T>& p, T* out) {
#pragma omp parallel for num_threads(p.num_threads) schedule(static)
  for (int64_t i = 0; i < p.n; ++i) {
    const T* row = p.x + i * p.x_stride;
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t k = 0; k < p.d; ++k) sum += row[k] * row[k];
    out[i] = inverse_norm(sum);
  }
}

// W is D x J row-major: its column norms are summed row by row over chunks of columns.
template <typename T>
void inverse_column_norms(const MarginSoftmaxParams<T>& p, T* out) {
  constexpr int64_t kChunk = 1024;
  const int64_t columns = p.classes * p.sub_centers;
#pragma omp parallel for num_threads(p.num_threads) schedule(static)
  for (int64_t chunk = 0; chunk < blocks(columns, kChunk); ++chunk) {
    const int64_t j0 = chunk * kChunk, count = std::min(kChunk, columns - j0);
    T* sums = out + j0;
    std::fill(sums, sums + count, T(0));
    for (int64_t k = 0; k < p.d; ++k) {
      const T* row = p.w + k * p.w_stride + j0;
#pragma omp simd
      for (int64_t j = 0; j < count; ++j) sums[j] += row[j] * row[j];
    }
    for (int64_t j = 0; j < count; ++j) sums[j] = inverse_norm(sums[j]);
  }
}

// The inverse norms of X's rows and W's columns, computed once per call (1 for a side left raw).
template <typename T>
struct InverseNorms {
  std::vector<T> rx, rw;
  explicit InverseNorms(const MarginSoftmaxParams<T>& p) : rx(p.n, T(1)), rw(p.classes * p.sub_centers, T(1)) {
    if (p.normalize_x) inverse_row_norms(p, rx.data());
    if (p.normalize_w) inverse_column_norms(p, rw.data());
  }
};

// tile[rows x cols] (leading dimension cols) = X[r0 : r0 + rows] W[:, j0 : j0 + cols], the raw products.
template <typename T>
void product_tile(const MarginSoftmaxParams<T>& p, int64_t r0, int64_t rows, int64_t j0, int64_t cols, T* tile) {
  p.gemm(false, false, rows, cols, p.d, p.x + r0 * p.x_stride, p.x_stride, p.w + j0, p.w_stride, T(0), tile, cols);
}

// Softmax pooling of one class's sub-centre cosines v_k (SoftTriple): p_k = softmax(pool_scale * v)_k, pooled
// cosine sum_k p_k v_k. Its derivative in v_k is q_k = p_k (1 + pool_scale (v_k - pooled)), which weight() gives.
template <typename T>
struct SoftPool {
  T top = -std::numeric_limits<T>::infinity(), sum = 0, pooled = 0, pool_scale;
  SoftPool(const T* products, const T* scale, T row_scale, int64_t sub_centers, T pool_scale_)
      : pool_scale(pool_scale_) {
    for (int64_t k = 0; k < sub_centers; ++k) top = std::max(top, products[k] * scale[k] * row_scale);
    T weighted = 0;
    for (int64_t k = 0; k < sub_centers; ++k) {
      const T value = products[k] * scale[k] * row_scale, e = std::exp(pool_scale * (value - top));
      sum += e;
      weighted += e * value;  // a NaN value makes both NaN, and so the pooled cosine
    }
    pooled = weighted / sum;
  }
  T weight(T value) const { return std::exp(pool_scale * (value - top)) / sum * (1 + pool_scale * (value - pooled)); }
};

// The cosines of a tile row's classes from its raw products, and (pick, where given) which sub-centre each came from:
// the largest (the first of equal ones; NaN wins, so that it reaches the loss), or with pool_scale > 0 their
// softmax-weighted mean (SoftPool; pick unused).
template <typename T>
void class_cosines(const T* products, const T* column_scale, T row_scale, int64_t classes, int64_t sub_centers,
                   T pool_scale, T* cosine, int32_t* pick) {
  if (sub_centers == 1) {
#pragma omp simd
    for (int64_t c = 0; c < classes; ++c) cosine[c] = products[c] * column_scale[c] * row_scale;
    return;
  }
  if (pool_scale > 0) {
    for (int64_t c = 0; c < classes; ++c)
      cosine[c] = SoftPool<T>(products + c * sub_centers, column_scale + c * sub_centers, row_scale, sub_centers,
                              pool_scale)
                      .pooled;
    return;
  }
  for (int64_t c = 0; c < classes; ++c) {
    const T* group = products + c * sub_centers;
    const T* scale = column_scale + c * sub_centers;
    T best = group[0] * scale[0] * row_scale;
    int32_t at = 0;
    for (int64_t k = 1; k < sub_centers; ++k) {
      const T value = group[k] * scale[k] * row_scale;
      if (value > best || value != value) best = value, at = static_cast<int32_t>(k);
    }
    cosine[c] = best;
    if (pick != nullptr) pick[c] = at;
  }
}

// Per-thread buffers of the tile loops.
template <typename T>
struct Scratch {
  std::vector<T> tile, gs, cosine, ds;
  std::vector<int32_t> pick;
  Scratch(int64_t rows, const Grid& g, int64_t sub_centers)
      : tile(rows * g.tile_classes * sub_centers), gs(rows * g.tile_classes * sub_centers), cosine(g.tile_classes),
        ds(g.tile_classes), pick(g.tile_classes) {}
};

// One tile row of the forward: folds scale * cos of the classes other than the label (`label`: its index in the
// tile, outside [0, classes) when the tile does not hold it) into the row's log-sum-exp.
template <typename T>
void forward_row(const T* cosine, int64_t classes, int64_t label, T scale, T* logit, OnlineLse<T>& state) {
  T top = -kInf<T>, bad = 0;
#pragma omp simd reduction(max : top) reduction(+ : bad)
  for (int64_t c = 0; c < classes; ++c) {
    const T value = c == label ? -kInf<T> : scale * cosine[c];
    logit[c] = value;
    top = value > top ? value : top;
    bad += value != value ? T(1) : T(0);
  }
  if (bad > 0) {
    state.merge(top, std::numeric_limits<T>::quiet_NaN());
    return;
  }
  if (top == -kInf<T>) return;  // only the label's class in this tile
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < classes; ++c) sum += vexp(logit[c] - top);
  state.merge(top, sum);
}

// What the backward needs of one row: its statistics' upstream gradients, its log-sum-exp and inverse norm.
template <typename T>
struct RowGradient {
  T g_lse, g_target, lse, rx;
  int64_t label;  // in the tile's classes
};

// One tile row of the backward: dS_c = dL/dcos_c (g_target for the label; g_lse scale softmax_c for the others)
// placed at each class's chosen column and scaled by the inverse norms (gs, 0 at the other sub-centres), and the
// row's sum_c dS_c cos_c (returned); column_sums, where given, gains dS_c cos_c at the chosen columns. Softmax
// pooling spreads dS_c over the class's columns by SoftPool::weight: each column j gets g_j = dS_c q_j, and the sums
// take g_j v_j.
template <typename T>
T gradient_row(const MarginSoftmaxParams<T>& p, const T* products, const T* rw, const RowGradient<T>& r,
               int64_t classes, Scratch<T>& s, T* gs, T* column_sums) {
  const int64_t sub_centers = p.sub_centers;
  const T scale = p.scale, softmax_scale = r.g_lse * p.scale;
  if (sub_centers > 1 && p.pool_scale > 0) {  // one pool per class, for its cosine and its columns' weights
    T pooled_dot = 0;
    for (int64_t c = 0; c < classes; ++c) {
      const int64_t j0 = c * sub_centers;
      const SoftPool<T> pool(products + j0, rw + j0, r.rx, sub_centers, p.pool_scale);
      const T ds = c == r.label ? r.g_target : softmax_scale * vexp(scale * pool.pooled - r.lse);
      for (int64_t k = 0; k < sub_centers; ++k) {
        const int64_t j = j0 + k;
        const T value = products[j] * rw[j] * r.rx, g = ds * pool.weight(value);
        gs[j] = g * r.rx * rw[j];
        pooled_dot += g * value;
        if (column_sums != nullptr) column_sums[j] += g * value;
      }
    }
    return pooled_dot;
  }
  T* cosine = s.cosine.data();
  T* ds = s.ds.data();
  class_cosines(products, rw, r.rx, classes, sub_centers, p.pool_scale, cosine,
                sub_centers > 1 ? s.pick.data() : nullptr);
  T dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t c = 0; c < classes; ++c) {
    const T value = c == r.label ? r.g_target : softmax_scale * vexp(scale * cosine[c] - r.lse);
    ds[c] = value;
    dot += value * cosine[c];
  }
  if (sub_centers == 1) {
#pragma omp simd
    for (int64_t c = 0; c < classes; ++c) gs[c] = ds[c] * r.rx * rw[c];
    if (column_sums != nullptr) {
#pragma omp simd
      for (int64_t c = 0; c < classes; ++c) column_sums[c] += ds[c] * cosine[c];
    }
    return dot;
  }
  std::fill(gs, gs + classes * sub_centers, T(0));
  for (int64_t c = 0; c < classes; ++c) {
    const int64_t j = c * sub_centers + s.pick[c];
    gs[j] = ds[c] * r.rx * rw[j];
    if (column_sums != nullptr) column_sums[j] += ds[c] * cosine[c];
  }
  return dot;
}

template <typename T>
RowGradient<T> row_gradient(const MarginSoftmaxBackwardParams<T>& b, const std::vector<T>& rx, int64_t row,
                            int64_t c0) {
  const int64_t n = b.rows.n;
  return {b.grad[row], b.grad[n + row], b.stats[row], rx[row], b.rows.labels[row] - c0};
}

// dX: row blocks x class splits (the forward's grid), each split's partial sums in its own buffer (split 0 in dx
// itself), added in split order; then the normalisation's term.
template <typename T>
void backward_dx(const MarginSoftmaxBackwardParams<T>& b, const Grid& g, const std::vector<T>& rx,
                 const std::vector<T>& rw) {
  const MarginSoftmaxParams<T>& p = b.rows;
  std::vector<T> partial_dx((g.splits - 1) * p.n * p.d), dots(g.splits * p.n, T(0));
  const auto buffer = [&](int64_t split) { return split == 0 ? b.dx : partial_dx.data() + (split - 1) * p.n * p.d; };
#pragma omp parallel num_threads(p.num_threads)
  {
    Scratch<T> s(kBlockRows, g, p.sub_centers);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < g.row_blocks * g.splits; ++task) {
      const auto [split, r0, rows] = row_task(p, g, task);
      T* dx = buffer(split) + r0 * p.d;
      T* dot = dots.data() + split * p.n + r0;
      const TileRange range = split_tiles(g, split);
      if (range.first >= range.last) std::fill(dx, dx + rows * p.d, T(0));
      for (int64_t t = range.first; t < range.last; ++t) {
        const ClassTile c = class_tile(p, g, t);
        product_tile(p, r0, rows, c.j0, c.cols, s.tile.data());
        for (int64_t i = 0; i < rows; ++i)
          dot[i] += gradient_row(p, s.tile.data() + i * c.cols, rw.data() + c.j0, row_gradient(b, rx, r0 + i, c.c0),
                                 c.classes, s, s.gs.data() + i * c.cols, static_cast<T*>(nullptr));
        p.gemm(false, true, rows, p.d, c.cols, s.gs.data(), c.cols, p.w + c.j0, p.w_stride,
               T(t == range.first ? 0 : 1), dx, p.d);  // dX (+)= gS W_tile^T
      }
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < p.n; ++i) {
      T* dx = b.dx + i * p.d;
      T dot = dots[i];
      for (int64_t split = 1; split < g.splits; ++split) {
        const T* part = buffer(split) + i * p.d;
#pragma omp simd
        for (int64_t k = 0; k < p.d; ++k) dx[k] += part[k];
        dot += dots[split * p.n + i];
      }
      const T term = radial(rx[i], p.normalize_x) ? rx[i] * rx[i] * dot : T(0);
      const T* x = p.x + i * p.x_stride;
#pragma omp simd
      for (int64_t k = 0; k < p.d; ++k) dx[k] -= term * x[k];
    }
  }
}

// dW: one class tile per task over every row block, its columns summed in row order into dw; then the
// normalisation's term.
template <typename T>
void backward_dw(const MarginSoftmaxBackwardParams<T>& b, const Grid& g, const std::vector<T>& rx,
                 const std::vector<T>& rw) {
  const MarginSoftmaxParams<T>& p = b.rows;
  const int64_t columns = p.classes * p.sub_centers;
#pragma omp parallel num_threads(p.num_threads)
  {
    Scratch<T> s(kBlockRows, g, p.sub_centers);
    std::vector<T> column_sums(g.tile_classes * p.sub_centers);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < g.class_tiles; ++t) {
      const ClassTile c = class_tile(p, g, t);
      T* dw = b.dw + c.j0;
      std::fill(column_sums.begin(), column_sums.end(), T(0));
      if (g.row_blocks == 0)
        for (int64_t k = 0; k < p.d; ++k) std::fill(dw + k * columns, dw + k * columns + c.cols, T(0));
      for (int64_t block = 0; block < g.row_blocks; ++block) {
        const int64_t r0 = block * kBlockRows, rows = std::min(kBlockRows, p.n - r0);
        product_tile(p, r0, rows, c.j0, c.cols, s.tile.data());
        for (int64_t i = 0; i < rows; ++i)
          gradient_row(p, s.tile.data() + i * c.cols, rw.data() + c.j0, row_gradient(b, rx, r0 + i, c.c0),
                       c.classes, s, s.gs.data() + i * c.cols, column_sums.data());
        p.gemm(true, false, p.d, c.cols, rows, p.x + r0 * p.x_stride, p.x_stride, s.gs.data(), c.cols,
               T(block == 0 ? 0 : 1), dw, columns);  // dW_tile (+)= X_block^T gS
      }
      for (int64_t j = 0; j < c.cols; ++j) {
        const T inverse = rw[c.j0 + j];
        column_sums[j] = radial(inverse, p.normalize_w) ? inverse * inverse * column_sums[j] : T(0);
      }
      for (int64_t k = 0; k < p.d; ++k) {
        T* out = dw + k * columns;
        const T* w = p.w + k * p.w_stride + c.j0;
#pragma omp simd
        for (int64_t j = 0; j < c.cols; ++j) out[j] -= column_sums[j] * w[j];
      }
    }
  }
}

}  // namespace

template <typename T>
void margin_softmax_forward(const MarginSoftmaxParams<T>& p, T* stats) {
  const Grid g = make_grid(p);
  const InverseNorms<T> norms(p);
  const std::vector<T>&rx = norms.rx, &rw = norms.rw;
  std::vector<OnlineLse<T>> partial(g.splits * p.n);
  T* target = stats + p.n;
  std::fill(target, target + p.n, std::numeric_limits<T>::quiet_NaN());  // every valid label overwrites it
#pragma omp parallel num_threads(p.num_threads)
  {
    Scratch<T> s(kBlockRows, g, p.sub_centers);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < g.row_blocks * g.splits; ++task) {
      const auto [split, r0, rows] = row_task(p, g, task);
      OnlineLse<T>* state = partial.data() + split * p.n + r0;
      const TileRange range = split_tiles(g, split);
      for (int64_t t = range.first; t < range.last; ++t) {
        const ClassTile c = class_tile(p, g, t);
        product_tile(p, r0, rows, c.j0, c.cols, s.tile.data());
        for (int64_t i = 0; i < rows; ++i) {
          class_cosines(s.tile.data() + i * c.cols, rw.data() + c.j0, rx[r0 + i], c.classes, p.sub_centers,
                        p.pool_scale, s.cosine.data(), static_cast<int32_t*>(nullptr));
          const int64_t label = p.labels[r0 + i] - c.c0;
          if (label >= 0 && label < c.classes) target[r0 + i] = s.cosine[label];
          forward_row(s.cosine.data(), c.classes, label, p.scale, s.ds.data(), state[i]);
        }
      }
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < p.n; ++i) {
      OnlineLse<T> state = partial[i];
      for (int64_t split = 1; split < g.splits; ++split)
        state.merge(partial[split * p.n + i].max, partial[split * p.n + i].sum);
      stats[i] = state.sum != state.sum ? state.sum : state.finish();
    }
  }
}

template <typename T>
void margin_softmax_backward(const MarginSoftmaxBackwardParams<T>& b) {
  const MarginSoftmaxParams<T>& p = b.rows;
  const Grid g = make_grid(p);
  const InverseNorms<T> norms(p);
  if (b.dx != nullptr) backward_dx(b, g, norms.rx, norms.rw);
  if (b.dw != nullptr) backward_dw(b, g, norms.rx, norms.rw);
}

template void margin_softmax_forward<float>(const MarginSoftmaxParams<float>&, float*);
template void margin_softmax_forward<double>(const MarginSoftmaxParams<double>&, double*);
template void margin_softmax_backward<float>(const MarginSoftmaxBackwardParams<float>&);
template void margin_softmax_backward<double>(const MarginSoftmaxBackwardParams<double>&);

}  // namespace metric_kernels::cpu
