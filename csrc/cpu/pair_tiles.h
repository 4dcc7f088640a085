// What the kernels over tiles of queries x references share (pair_rows.cpp, triplet_margin.cpp): the tile sizes, the
// similarity tile, a row's arguments beside its tile row, the choice of ISA for the row functions, and the backward's
// passes, which take dS of a tile from the loss (TileDs below) and do the rest: S, the GEMMs, the norm terms.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#include "../epilogue.h"
#include "../params.h"
#include "tiling.h"

// The per-row loops of the kernels are written for the vectoriser: the loss and the pair value are template
// arguments (no branch per entry), masks are selects, and each row's exponentials run in a loop of their own over a
// buffer (vexp, vec_exp.h), with OpenMP simd reductions for the sums and maxima. On x86-64 each row function is
// compiled twice, for the baseline ISA and for AVX2 + FMA, and picked per call (METRIC_KERNELS_CPU_BASELINE=1 forces
// the baseline).
#if defined(__x86_64__) && defined(__GNUC__)
#define MK_AVX2 __attribute__((target("avx2,fma")))
#define MK_HAS_AVX2_BUILD 1
#else
#define MK_AVX2
#define MK_HAS_AVX2_BUILD 0
#endif

namespace metric_kernels::cpu {

constexpr int64_t kBlockRows = 64;
constexpr int64_t kBlockCols = 256;

inline bool env_flag(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && value[0] != '\0' && value[0] != '0';
}

// The backward keeps the whole N x M matrix dS (S computed once, each exponential once, dX and dY each one GEMM per
// block) when it has at most this many entries (16 MiB in float32, 32 MiB in float64); above it, the tiled passes
// (S and dS recomputed per pass, extra memory two tiles per thread). METRIC_KERNELS_CPU_KEEP_ENTRIES overrides it
// (tests: 0 forces the tiled passes).
inline int64_t keep_entries() {
  const char* value = std::getenv("METRIC_KERNELS_CPU_KEEP_ENTRIES");
  return value != nullptr && value[0] != '\0' ? std::strtoll(value, nullptr, 10) : int64_t(1) << 22;
}

// Whether the AVX2 + FMA row functions run: the CPU has them, and METRIC_KERNELS_CPU_BASELINE is not set (tests
// compare both). Read per call (a getenv), so tests can switch it.
inline bool use_avx2() {
#if MK_HAS_AVX2_BUILD
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return supported && !env_flag("METRIC_KERNELS_CPU_BASELINE");
#else
  return false;
#endif
}

// tile[rows x cols] (leading dimension cols) = X[r0 : r0 + rows] . Y[c0 : c0 + cols]^T
template <typename T>
void similarity_tile(const PairRowsParams<T>& p, int64_t r0, int64_t rows, int64_t c0, int64_t cols, T* tile) {
  p.gemm(false, true, rows, cols, p.d, p.x + r0 * p.x_stride, p.x_stride, p.y + c0 * p.y_stride, p.y_stride, T(0),
         tile, cols);
}

// One query row against `cols` consecutive references c0 ..: what the row functions read beside the tile row.
template <typename T>
struct RowArgs {
  const int64_t* y_labels;  // the references' labels from c0
  const T* y_sq;            // their squared norms from c0 (nullptr for the similarity)
  int64_t x_label;
  int64_t self_col;  // column (from c0) of the pair that is neither positive nor negative; outside [0, cols): none
  int64_t cols;
  T x_sq, a, b;
};

template <typename T>
RowArgs<T> row_args(const PairRowsParams<T>& p, int64_t row, int64_t c0, int64_t cols) {
  return RowArgs<T>{p.y_labels + c0,
                    p.y_sq != nullptr ? p.y_sq + c0 : nullptr,
                    p.x_labels[row],
                    p.self_offset < 0 ? int64_t(-1) : row + p.self_offset - c0,
                    cols,
                    p.x_sq != nullptr ? p.x_sq[row] : T(0),
                    p.a,
                    p.b};
}

// The norm term of the distances' gradients (epilogue.h, has_norm_term): out[k] -= sums[k] * rows[k] for `count`
// rows of D, `rows` with row stride `stride`.
template <typename T>
void subtract_norm_term(T* out, const T* sums, const T* rows, int64_t stride, int64_t count, int64_t d) {
  for (int64_t k = 0; k < count; ++k)
    for (int64_t e = 0; e < d; ++e) out[k * d + e] -= sums[k] * rows[k * stride + e];
}

// dS <- dS + dS^T of the square N x N matrix (ld n) for rows r0 .. r0 + rows against every column from r0 on: the
// pairs of square sub-blocks (I, J >= I), each read and written through a row-major copy of block (J, I), since a
// column walk with a stride of a power of two bytes would evict itself from the cache. Every entry is written by the
// owner of the lower of its two row blocks only, so row blocks may run in parallel.
template <typename T>
void add_transpose(T* ds, int64_t n, int64_t r0, int64_t rows) {
  constexpr int64_t kSquare = 32;
  T lower[kSquare * kSquare];  // lower[jj * kSquare + ii] = dS[j0 + jj][i0 + ii]
  for (int64_t i0 = r0; i0 < r0 + rows; i0 += kSquare) {
    const int64_t ni = std::min(kSquare, r0 + rows - i0);
    for (int64_t j0 = i0; j0 < n; j0 += kSquare) {
      const int64_t nj = std::min(kSquare, n - j0);
      for (int64_t jj = 0; jj < nj; ++jj)
        for (int64_t ii = 0; ii < ni; ++ii) lower[jj * kSquare + ii] = ds[(j0 + jj) * n + i0 + ii];
      for (int64_t ii = 0; ii < ni; ++ii) {
        T* row = ds + (i0 + ii) * n + j0;
        for (int64_t jj = 0; jj < nj; ++jj) {
          const T both = row[jj] + lower[jj * kSquare + ii];  // the diagonal block: from the untouched copy
          row[jj] = both;
          lower[jj * kSquare + ii] = both;
        }
      }
      if (j0 != i0)
        for (int64_t jj = 0; jj < nj; ++jj)
          for (int64_t ii = 0; ii < ni; ++ii) ds[(j0 + jj) * n + i0 + ii] = lower[jj * kSquare + ii];
    }
  }
}

// The backward passes below ask a loss for dS of a tile through a TileDs, which has
//   Scratch scratch(int64_t cols) const        one thread's scratch, for tiles of up to `cols` columns
//   void operator()(Scratch&, int64_t r0, int64_t rows, int64_t c0, int64_t cols, T* tile, int64_t ld, T* sums) const
// the latter turning tile[rows x cols] (leading dimension ld), S of rows r0 .. and columns c0 .., into dS in place and
// adding each row's sum of dS to sums[i] where sums is not null (the distances' norm terms).

// The backward with the whole dS kept (N x M <= keep_entries()): per row block, S with one GEMM and dS in place;
// then dX with one GEMM per row block and dY with one per column block. When the references are the queries (dY
// adds into dX), dX + dY = (dS + dS^T) X: one GEMM. Fixed order everywhere: deterministic.
template <typename T, typename TileDs>
void backward_kept(const PairRowsBackwardParams<T>& b, const TileDs& tile_ds) {
  const PairRowsParams<T>& p = b.pair;
  const bool norm_term = has_norm_term(p.pair_value);
  const bool symmetric = b.dx != nullptr && b.dy == b.dx && b.accumulate_dy && p.x == p.y && p.n == p.m &&
                         p.x_stride == p.y_stride;
  const std::unique_ptr<T[]> ds(new T[p.n * p.m]);
#pragma omp parallel num_threads(p.num_threads)
  {
    auto scratch = tile_ds.scratch(p.m);
    std::vector<T> sums(std::max(kBlockRows, kBlockCols));
#pragma omp for schedule(static)
    for (int64_t block = 0; block < blocks(p.n, kBlockRows); ++block) {
      const int64_t r0 = block * kBlockRows, rows = std::min(kBlockRows, p.n - r0);
      T* tile = ds.get() + r0 * p.m;
      similarity_tile(p, r0, rows, 0, p.m, tile);
      tile_ds(scratch, r0, rows, 0, p.m, tile, p.m, static_cast<T*>(nullptr));
    }
    if (symmetric) {
#pragma omp for schedule(static, 1)
      for (int64_t block = 0; block < blocks(p.n, kBlockRows); ++block)
        add_transpose(ds.get(), p.n, block * kBlockRows, std::min(kBlockRows, p.n - block * kBlockRows));
    }
    if (b.dx != nullptr) {
#pragma omp for schedule(static)
      for (int64_t block = 0; block < blocks(p.n, kBlockRows); ++block) {
        const int64_t r0 = block * kBlockRows, rows = std::min(kBlockRows, p.n - r0);
        const T* tile = ds.get() + r0 * p.m;
        T* dx = b.dx + r0 * p.d;
        p.gemm(false, false, rows, p.d, p.m, tile, p.m, p.y, p.y_stride, T(0), dx, p.d);  // dX = dS Y
        if (norm_term) {
          for (int64_t i = 0; i < rows; ++i) sums[i] = lane_sum(tile + i * p.m, p.m);
          subtract_norm_term(dx, sums.data(), p.x + r0 * p.x_stride, p.x_stride, rows, p.d);
        }
      }
    }
    // (each omp for ends in a barrier: dS complete before it is read across blocks, dX written before dY adds in)
    if (b.dy != nullptr && !symmetric) {
      // column blocks as narrow as the row blocks: more blocks than threads at small M
#pragma omp for schedule(static)
      for (int64_t block = 0; block < blocks(p.m, kBlockRows); ++block) {
        const int64_t c0 = block * kBlockRows, cols = std::min(kBlockRows, p.m - c0);
        T* dy = b.dy + c0 * p.d;
        p.gemm(true, false, cols, p.d, p.n, ds.get() + c0, p.m, p.x, p.x_stride, T(b.accumulate_dy ? 1 : 0), dy,
               p.d);  // dY (+)= dS^T X
        if (norm_term) {
          std::fill(sums.begin(), sums.end(), T(0));
          for (int64_t i = 0; i < p.n; ++i) {
            const T* row = ds.get() + i * p.m + c0;
            for (int64_t j = 0; j < cols; ++j) sums[j] += row[j];
          }
          subtract_norm_term(dy, sums.data(), p.y + c0 * p.y_stride, p.y_stride, cols, p.d);
        }
      }
    }
  }
}

// dX over row blocks, then dY over column blocks, each block summed in a fixed order (deterministic, no atomics):
// backward_kept where N x M <= keep_entries(), else tiles of S and dS recomputed per pass (extra memory two tiles
// per thread).
template <typename T, typename TileDs>
void pair_rows_backward(const PairRowsBackwardParams<T>& b, const TileDs& tile_ds) {
  const PairRowsParams<T>& p = b.pair;
  if (p.n * p.m <= keep_entries()) {
    backward_kept(b, tile_ds);
    return;
  }
  const bool norm_term = has_norm_term(p.pair_value);
  if (b.dx != nullptr) {
#pragma omp parallel num_threads(p.num_threads)
    {
      std::vector<T> tile(kBlockRows * kBlockCols), sums(kBlockRows);
      auto scratch = tile_ds.scratch(kBlockCols);
#pragma omp for schedule(static)
      for (int64_t block = 0; block < blocks(p.n, kBlockRows); ++block) {
        const int64_t r0 = block * kBlockRows, rows = std::min(kBlockRows, p.n - r0);
        T* dx = b.dx + r0 * p.d;
        std::fill(dx, dx + rows * p.d, T(0));
        std::fill(sums.begin(), sums.end(), T(0));
        for (int64_t c0 = 0; c0 < p.m; c0 += kBlockCols) {
          const int64_t cols = std::min(kBlockCols, p.m - c0);
          similarity_tile(p, r0, rows, c0, cols, tile.data());
          tile_ds(scratch, r0, rows, c0, cols, tile.data(), cols, norm_term ? sums.data() : nullptr);
          p.gemm(false, false, rows, p.d, cols, tile.data(), cols, p.y + c0 * p.y_stride, p.y_stride, T(1), dx,
                 p.d);  // dX += dS Y
        }
        if (norm_term) subtract_norm_term(dx, sums.data(), p.x + r0 * p.x_stride, p.x_stride, rows, p.d);
      }
    }
  }
  if (b.dy != nullptr) {
    // Runs after the dX pass: when dy is dx, each column block adds into rows no other thread touches now.
#pragma omp parallel num_threads(p.num_threads)
    {
      std::vector<T> tile(kBlockRows * kBlockCols), sums(kBlockCols);
      auto scratch = tile_ds.scratch(kBlockCols);
#pragma omp for schedule(static)
      for (int64_t block = 0; block < blocks(p.m, kBlockCols); ++block) {
        const int64_t c0 = block * kBlockCols, cols = std::min(kBlockCols, p.m - c0);
        T* dy = b.dy + c0 * p.d;
        if (!b.accumulate_dy) std::fill(dy, dy + cols * p.d, T(0));
        std::fill(sums.begin(), sums.end(), T(0));
        for (int64_t r0 = 0; r0 < p.n; r0 += kBlockRows) {
          const int64_t rows = std::min(kBlockRows, p.n - r0);
          similarity_tile(p, r0, rows, c0, cols, tile.data());
          tile_ds(scratch, r0, rows, c0, cols, tile.data(), cols, static_cast<T*>(nullptr));
          p.gemm(true, false, cols, p.d, rows, tile.data(), cols, p.x + r0 * p.x_stride, p.x_stride, T(1), dy,
                 p.d);  // dY += dS^T X
          if (norm_term)
            for (int64_t i = 0; i < rows; ++i)
              for (int64_t j = 0; j < cols; ++j) sums[j] += tile[i * cols + j];
        }
        if (norm_term) subtract_norm_term(dy, sums.data(), p.y + c0 * p.y_stride, p.y_stride, cols, p.d);
      }
    }
  }
}

}  // namespace metric_kernels::cpu
