// 64 x 64 tile products for one block of 128 threads (4 warps), the only matrix arithmetic of the CUDA kernels:
//
//   C[64 x 64] += op(A)[64 x k] op(B)[k x 64]     A, B in shared memory, C in registers
//
// op(A) reads A row-major or column-major (A^T for free), the same for B, so S = X Y^T, dX = dS Y and dY = dS^T X
// are one routine. Two implementations behind one interface:
//   WmmaTile<half | bf16>: tensor cores (WMMA m16n16k16), fp32 accumulation;
//   WmmaTile<Tf32>:        tensor cores in tf32 (m16n16k8) on fp32 operands, for torch's "high" matmul precision;
//   SimtTile<float | double>: IEEE fused multiply-adds on the CUDA cores (fp32 at "highest" precision, and fp64).
// Each warp owns a 32 x 32 quarter of C (WMMA: 2 x 2 fragments); under SIMT each thread owns 8 rows x 4 columns
// (16 apart).
//
// WMMA's loads need 32-byte aligned pointers and leading dimensions that are multiples of 16 bytes: the kernels'
// shared-memory layout (lse_rows.cu) keeps every tile base 128-byte aligned and pads rows by 16 bytes.
#pragma once

#ifdef METRIC_KERNELS_HOST_EMULATION
#include "host_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>
#include <mma.h>
#endif

#include <cstdint>
#include <type_traits>

namespace metric_kernels::cuda {

constexpr int kTile = 64;      // rows and columns of every tile
constexpr int kThreads = 128;  // 4 warps

struct RowMajor {
  static constexpr bool kColumnMajor = false;
};
struct ColMajor {
  static constexpr bool kColumnMajor = true;
};

// Element (i, j) of a matrix stored with leading dimension ld in the given layout.
template <class Layout, class T>
__device__ __forceinline__ const T& at(const T* base, int ld, int i, int j) {
  return Layout::kColumnMajor ? base[i + static_cast<int64_t>(j) * ld] : base[static_cast<int64_t>(i) * ld + j];
}
template <class Layout, class T>
__device__ __forceinline__ const T* offset(const T* base, int ld, int i, int j) {
  return &at<Layout>(base, ld, i, j);
}

struct Tf32 {};  // tag: fp32 operands multiplied on tensor cores in tf32

template <class Tag>
struct WmmaTraits;
template <>
struct WmmaTraits<__half> {
  using Storage = __half;
  using Precision = __half;
  static constexpr int kK = 16;
};
template <>
struct WmmaTraits<__nv_bfloat16> {
  using Storage = __nv_bfloat16;
  using Precision = __nv_bfloat16;
  static constexpr int kK = 16;
};
template <>
struct WmmaTraits<Tf32> {
  using Storage = float;
  using Precision = nvcuda::wmma::precision::tf32;
  static constexpr int kK = 8;
};

template <class Tag>
struct WmmaTile {
  using Traits = WmmaTraits<Tag>;
  using Operand = typename Traits::Storage;  // what the operand tiles hold in shared memory
  using Acc = float;                         // accumulation, statistics, gradients
  static constexpr int kK = Traits::kK;
  // Elements added to each row of the shared tiles (engine.cuh's SharedLayout): 16 bytes keep WMMA's leading
  // dimensions legal (multiples of 16 bytes) and make a row's stride an odd number of 16-byte units, so the 8 rows
  // a fragment load reads at a time (16 bytes each) fall on distinct banks.
  static constexpr int kChunkPad = 16 / static_cast<int>(sizeof(Operand));
  static constexpr int kTilePad = kChunkPad;
  static constexpr int kAccPad = 16 / static_cast<int>(sizeof(Acc));
  static constexpr int kStages = 2;  // D chunks in flight: the next one's asynchronous copy overlaps this one's product
  using Fragment = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, kK, float>;

  struct Accumulator {
    Fragment c[2][2];
  };

  __device__ static void zero(Accumulator& acc) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc.c[i][j], 0.0f);
  }

  // acc += op(A)[64 x k] op(B)[k x 64]; k a multiple of kK.
  template <class LayoutA, class LayoutB>
  __device__ static void mma(Accumulator& acc, const Operand* a, int lda, const Operand* b, int ldb, int k) {
    namespace wmma = nvcuda::wmma;
    using WmmaA = typename std::conditional<LayoutA::kColumnMajor, wmma::col_major, wmma::row_major>::type;
    using WmmaB = typename std::conditional<LayoutB::kColumnMajor, wmma::col_major, wmma::row_major>::type;
    const int warp = threadIdx.x / 32, row0 = (warp / 2) * 32, col0 = (warp % 2) * 32;
    // Not unrolled, and one A fragment live at a time: the backward holds up to four 64 x 64 accumulators (D up to
    // 256) and ran ptxas out of registers (spills) otherwise.
#pragma unroll 1
    for (int kk = 0; kk < k; kk += kK) {
      wmma::fragment<wmma::matrix_b, 16, 16, kK, typename Traits::Precision, WmmaB> fb[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::load_matrix_sync(fb[j], offset<LayoutB>(b, ldb, kk, col0 + 16 * j), ldb);
        to_precision(fb[j]);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::fragment<wmma::matrix_a, 16, 16, kK, typename Traits::Precision, WmmaA> fa;
        wmma::load_matrix_sync(fa, offset<LayoutA>(a, lda, row0 + 16 * i, kk), lda);
        to_precision(fa);
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc.c[i][j], fa, fb[j], acc.c[i][j]);
      }
    }
  }

  // fp32 operands enter the tensor cores in tf32, rounded to nearest (the others as they are).
  template <class Fragment>
  __device__ static void to_precision(Fragment& fragment) {
    if constexpr (std::is_same<Tag, Tf32>::value) {
#pragma unroll
      for (int e = 0; e < fragment.num_elements; ++e) fragment.x[e] = nvcuda::wmma::__float_to_tf32(fragment.x[e]);
    }
  }

  // c[64 x 64] (row-major, leading dimension ldc) = op(A)[64 x k] op(B)[k x 64] (kAccumulate: +=), one 16 x 16
  // fragment at a time: for callers that hold other accumulators (one fragment's registers live instead of a whole
  // Accumulator's), or whose accumulator lives in shared memory.
  template <class LayoutA, class LayoutB, bool kAccumulate = false>
  __device__ static void product_to(Acc* c, int ldc, const Operand* a, int lda, const Operand* b, int ldb, int k) {
    namespace wmma = nvcuda::wmma;
    using WmmaA = typename std::conditional<LayoutA::kColumnMajor, wmma::col_major, wmma::row_major>::type;
    using WmmaB = typename std::conditional<LayoutB::kColumnMajor, wmma::col_major, wmma::row_major>::type;
    const int warp = threadIdx.x / 32, row0 = (warp / 2) * 32, col0 = (warp % 2) * 32;
#pragma unroll 1
    for (int part = 0; part < 4; ++part) {
      const int i = part / 2, j = part % 2;
      Acc* tile = c + (row0 + 16 * i) * ldc + col0 + 16 * j;
      Fragment acc;
      if (kAccumulate) {
        wmma::load_matrix_sync(acc, tile, ldc, wmma::mem_row_major);
      } else {
        wmma::fill_fragment(acc, 0.0f);
      }
#pragma unroll 1
      for (int kk = 0; kk < k; kk += kK) {
        wmma::fragment<wmma::matrix_a, 16, 16, kK, typename Traits::Precision, WmmaA> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, kK, typename Traits::Precision, WmmaB> fb;
        wmma::load_matrix_sync(fa, offset<LayoutA>(a, lda, row0 + 16 * i, kk), lda);
        wmma::load_matrix_sync(fb, offset<LayoutB>(b, ldb, kk, col0 + 16 * j), ldb);
        to_precision(fa);
        to_precision(fb);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(tile, acc, ldc, wmma::mem_row_major);
    }
  }

  // c[64 x 64] (row-major, leading dimension ldc) = acc
  __device__ static void store(const Accumulator& acc, Acc* c, int ldc) {
    const int warp = threadIdx.x / 32, row0 = (warp / 2) * 32, col0 = (warp % 2) * 32;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(c + (row0 + 16 * i) * ldc + col0 + 16 * j, acc.c[i][j], ldc,
                                        nvcuda::wmma::mem_row_major);
  }

  // fp16 saturates at its largest finite value rather than overflowing to inf (NaN stays NaN).
  __device__ static Operand to_operand(Acc value) {
    if constexpr (std::is_same<Tag, __half>::value) {
      constexpr float kLargest = 65504.0f;
      value = value > kLargest ? kLargest : (value < -kLargest ? -kLargest : value);
    }
    return Operand(value);
  }
};

// Thread t owns rows row0() + i (i < kRows) and columns col0() + kColStride j (j < kCols) of C. A warp's two row groups
// are 8 rows apart and its 16 column lanes adjacent, so a step of the product reads, per warp, 2 elements of A and 16
// of B, adjacent (row-major B) or ld apart (column-major B): with the pads below every read, and the stores of C, hit
// distinct banks (4-byte words mod 32; for fp64 per half-warp), which tests/test_cuda_compile.py's bank check holds.
template <class T>
struct SimtTile {
  using Operand = T;
  using Acc = T;
  static constexpr int kK = 1;
  static constexpr int kRows = 8, kCols = 4;  // per thread; 8 x 16 threads cover the 64 x 64 tile
  static constexpr int kColStride = 16;
  // The chunks' leading dimension odd (33: a column-major read's 16 lanes ld apart), the 64-wide tiles' and C's
  // 2 mod 4 (66: two row groups 8 rows apart land 16 banks apart; the epilogue's 16 rows 2 banks apart).
  static constexpr int kChunkPad = 1;
  static constexpr int kTilePad = 2;
  static constexpr int kAccPad = 2;
  // fp64's second stage would take the backward's shared memory past an sm_80's 163 KB
  static constexpr int kStages = sizeof(T) == 8 ? 1 : 2;

  __host__ __device__ static constexpr int row0_of(int thread) { return (thread / 16) * kRows; }
  __host__ __device__ static constexpr int col0_of(int thread) { return thread % 16; }
  __device__ static int row0() { return row0_of(threadIdx.x); }
  __device__ static int col0() { return col0_of(threadIdx.x); }

  struct Accumulator {
    T c[kRows][kCols];
  };

  __device__ static void zero(Accumulator& acc) {
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int j = 0; j < kCols; ++j) acc.c[i][j] = T(0);
  }

  template <class LayoutA, class LayoutB>
  __device__ static void mma(Accumulator& acc, const T* a, int lda, const T* b, int ldb, int k) {
#ifdef METRIC_KERNELS_HOST_EMULATION
    host_emulation::count_work(sizeof(T) == 8 ? host_emulation::Work::kDotFp64 : host_emulation::Work::kDotFp32,
                               2ull * kRows * kCols * k);
#endif
    const int row0 = SimtTile::row0(), col0 = SimtTile::col0();
    for (int kk = 0; kk < k; ++kk) {
      T av[kRows], bv[kCols];
#pragma unroll
      for (int i = 0; i < kRows; ++i) av[i] = at<LayoutA>(a, lda, row0 + i, kk);
#pragma unroll
      for (int j = 0; j < kCols; ++j) bv[j] = at<LayoutB>(b, ldb, kk, col0 + kColStride * j);
#pragma unroll
      for (int i = 0; i < kRows; ++i)
#pragma unroll
        for (int j = 0; j < kCols; ++j) acc.c[i][j] = fma(av[i], bv[j], acc.c[i][j]);
    }
  }

  template <class LayoutA, class LayoutB, bool kAccumulate = false>
  __device__ static void product_to(Acc* c, int ldc, const T* a, int lda, const T* b, int ldb, int k) {
    Accumulator acc;
    if (kAccumulate) {
      load(acc, c, ldc);
    } else {
      zero(acc);
    }
    mma<LayoutA, LayoutB>(acc, a, lda, b, ldb, k);
    store(acc, c, ldc);
  }

  // acc = c[64 x 64] (row-major, leading dimension ldc), as store writes it
  __device__ static void load(Accumulator& acc, const Acc* c, int ldc) {
    const int row0 = SimtTile::row0(), col0 = SimtTile::col0();
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int j = 0; j < kCols; ++j) acc.c[i][j] = c[(row0 + i) * ldc + col0 + kColStride * j];
  }

  __device__ static void store(const Accumulator& acc, Acc* c, int ldc) {
    const int row0 = SimtTile::row0(), col0 = SimtTile::col0();
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int j = 0; j < kCols; ++j) c[(row0 + i) * ldc + col0 + kColStride * j] = acc.c[i][j];
  }

  __device__ static Operand to_operand(Acc value) { return value; }
};

}  // namespace metric_kernels::cuda
