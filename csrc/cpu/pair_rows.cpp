#include "pair_rows.h"

#include <algorithm>
#include <limits>
#include <vector>

#include "../epilogue.h"

namespace metric_kernels::cpu {
namespace {

constexpr int64_t kBlockRows = 64;
constexpr int64_t kBlockCols = 256;

int64_t blocks(int64_t size, int64_t block) { return (size + block - 1) / block; }

// tile[rows x cols] = X[r0 : r0 + rows] . Y[c0 : c0 + cols]^T
template <typename T>
void similarity_tile(const PairRowsParams<T>& p, int64_t r0, int64_t rows, int64_t c0, int64_t cols, T* tile) {
  p.gemm(false, true, rows, cols, p.d, p.x + r0 * p.x_stride, p.x_stride, p.y + c0 * p.y_stride, p.y_stride, T(0),
         tile, cols);
}

// A row's squared norm where the pair value needs it (0 otherwise: the similarity ignores it).
template <typename T>
T squared_norm(const T* sq, int64_t index) {
  return sq != nullptr ? sq[index] : T(0);
}

// tile <- dS of the tile, from the saved statistics and upstream gradients of rows r0 ..
template <typename T>
void ds_tile(const PairRowsBackwardParams<T>& b, int64_t r0, int64_t rows, int64_t c0, int64_t cols, T* tile) {
  const PairRowsParams<T>& p = b.pair;
  similarity_tile(p, r0, rows, c0, cols, tile);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t row = r0 + i;
    const T g1 = b.grad[row], g2 = b.grad[p.n + row], g3 = b.grad[2 * p.n + row];
    const T lse1 = b.stats[row], lse2 = b.stats[p.n + row];
    const T row_sq = squared_norm(p.x_sq, row);
    T* out = tile + i * cols;
    for (int64_t j = 0; j < cols; ++j) {
      bool positive, negative;
      pair_kind(p.x_labels[row], p.y_labels[c0 + j], row, c0 + j, p.self_offset, positive, negative);
      out[j] = ds_entry(p.kind, p.pair_value, out[j], row_sq, squared_norm(p.y_sq, c0 + j), p.a, p.b, positive,
                        negative, g1, g2, g3, lse1, lse2);
    }
  }
}

// The norm term of the distances' gradients (epilogue.h, has_norm_term): out[k] -= sums[k] * rows[k] for `count`
// rows of D, `rows` with row stride `stride`.
template <typename T>
void subtract_norm_term(T* out, const T* sums, const T* rows, int64_t stride, int64_t count, int64_t d) {
  for (int64_t k = 0; k < count; ++k)
    for (int64_t e = 0; e < d; ++e) out[k * d + e] -= sums[k] * rows[k * stride + e];
}

}  // namespace

template <typename T>
void lse_rows_forward(const PairRowsParams<T>& p, T* stats) {
#pragma omp parallel num_threads(p.num_threads)
  {
    std::vector<T> tile(kBlockRows * kBlockCols);
    std::vector<OnlineLse<T>> first(kBlockRows), second(kBlockRows);
    std::vector<T> linear(kBlockRows);
#pragma omp for schedule(static)
    for (int64_t block = 0; block < blocks(p.n, kBlockRows); ++block) {
      const int64_t r0 = block * kBlockRows, rows = std::min(kBlockRows, p.n - r0);
      std::fill(first.begin(), first.end(), OnlineLse<T>{});
      std::fill(second.begin(), second.end(), OnlineLse<T>{});
      std::fill(linear.begin(), linear.end(), T(0));
      for (int64_t c0 = 0; c0 < p.m; c0 += kBlockCols) {
        const int64_t cols = std::min(kBlockCols, p.m - c0);
        similarity_tile(p, r0, rows, c0, cols, tile.data());
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t row = r0 + i;
          const T* s = tile.data() + i * cols;
          const T row_sq = squared_norm(p.x_sq, row);
          for (int64_t j = 0; j < cols; ++j) {
            bool positive, negative;
            pair_kind(p.x_labels[row], p.y_labels[c0 + j], row, c0 + j, p.self_offset, positive, negative);
            const T v = pair_value(p.pair_value, s[j], row_sq, squared_norm(p.y_sq, c0 + j));
            const Logits<T> l = loss_logits(p.kind, v, p.a, p.b);
            if (in_first(p.kind, positive)) first[i].add(l.value1);
            if (in_second(p.kind, positive, negative)) second[i].add(l.value2);
            if (p.kind == kSupCon && positive) linear[i] += v;
          }
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        stats[r0 + i] = first[i].finish();
        stats[p.n + r0 + i] = second[i].finish();
        stats[2 * p.n + r0 + i] = linear[i];
      }
    }
  }
}

template <typename T>
void lse_rows_backward(const PairRowsBackwardParams<T>& b) {
  const PairRowsParams<T>& p = b.pair;
  if (b.dx != nullptr) {
#pragma omp parallel num_threads(p.num_threads)
    {
      std::vector<T> tile(kBlockRows * kBlockCols), sums(kBlockRows);
#pragma omp for schedule(static)
      for (int64_t block = 0; block < blocks(p.n, kBlockRows); ++block) {
        const int64_t r0 = block * kBlockRows, rows = std::min(kBlockRows, p.n - r0);
        T* dx = b.dx + r0 * p.d;
        std::fill(dx, dx + rows * p.d, T(0));
        std::fill(sums.begin(), sums.end(), T(0));
        for (int64_t c0 = 0; c0 < p.m; c0 += kBlockCols) {
          const int64_t cols = std::min(kBlockCols, p.m - c0);
          ds_tile(b, r0, rows, c0, cols, tile.data());
          p.gemm(false, false, rows, p.d, cols, tile.data(), cols, p.y + c0 * p.y_stride, p.y_stride, T(1), dx,
                 p.d);  // dX += dS Y
          if (has_norm_term(p.pair_value))
            for (int64_t i = 0; i < rows; ++i)
              for (int64_t j = 0; j < cols; ++j) sums[i] += tile[i * cols + j];
        }
        if (has_norm_term(p.pair_value))
          subtract_norm_term(dx, sums.data(), p.x + r0 * p.x_stride, p.x_stride, rows, p.d);
      }
    }
  }
  if (b.dy != nullptr) {
    // Runs after the dX pass: when dy is dx, each column block adds into rows no other thread touches now.
#pragma omp parallel num_threads(p.num_threads)
    {
      std::vector<T> tile(kBlockRows * kBlockCols), sums(kBlockCols);
#pragma omp for schedule(static)
      for (int64_t block = 0; block < blocks(p.m, kBlockCols); ++block) {
        const int64_t c0 = block * kBlockCols, cols = std::min(kBlockCols, p.m - c0);
        T* dy = b.dy + c0 * p.d;
        if (!b.accumulate_dy) std::fill(dy, dy + cols * p.d, T(0));
        std::fill(sums.begin(), sums.end(), T(0));
        for (int64_t r0 = 0; r0 < p.n; r0 += kBlockRows) {
          const int64_t rows = std::min(kBlockRows, p.n - r0);
          ds_tile(b, r0, rows, c0, cols, tile.data());
          p.gemm(true, false, cols, p.d, rows, tile.data(), cols, p.x + r0 * p.x_stride, p.x_stride, T(1), dy,
                 p.d);  // dY += dS^T X
          if (has_norm_term(p.pair_value))
            for (int64_t i = 0; i < rows; ++i)
              for (int64_t j = 0; j < cols; ++j) sums[j] += tile[i * cols + j];
        }
        if (has_norm_term(p.pair_value))
          subtract_norm_term(dy, sums.data(), p.y + c0 * p.y_stride, p.y_stride, cols, p.d);
      }
    }
  }
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
