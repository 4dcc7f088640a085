// The tiled engine shared by the CUDA kernels: one block of 128 threads owns a 64 x 64 tile of the similarity matrix
// S = X Y^T at a time, forms it in shared memory from 64 x 32 chunks of X and Y (tile_mma.cuh), and hands it to a
// loss epilogue (lse_rows.cu, batch_hard.cu). Nothing of size N x M exists outside the tile.
//
// The epilogues read the S tile two threads per row (thread t: row t / 2, columns t % 2, t % 2 + 2, ...), so per-row
// state lives in registers and the two halves of a row meet through one warp shuffle.
#pragma once

#include <cstdint>

#include "../epilogue.h"
#include "../params.h"
#include "launch.h"
#include "tile_mma.cuh"

namespace metric_kernels::cuda {

constexpr int kChunk = 32;  // D columns per step of S = X Y^T
constexpr double kNormEps = 1e-12;  // F.normalize's eps: a row is divided by max(|row|, eps)

constexpr int64_t align128(int64_t bytes) { return (bytes + 127) / 128 * 128; }

// How many 64-wide tiles cover `size`.
__host__ __device__ constexpr int64_t blocks(int64_t size) { return (size + kTile - 1) / kTile; }

// How many 64-wide slices of D one backward block holds with their accumulators in registers (lse_rows.cu,
// margin_softmax.cu): the whole of D up to 256, so that each pass recomputes every product tile once (blocks along D
// only above that, each recomputing the tile). fp64's accumulators (64 registers a slice) allow one. kAtomic: the
// atomic dX pass, which also forms dY = P^T X per slice, holds two there (with four next to the dY product ptxas
// spilled on sm_90a) and the next kSharedSlices in shared memory, so that it too takes D up to 256 in one span.
template <class Policy, bool kAtomic = false>
constexpr int kSlices = sizeof(typename Policy::Acc) == 8 ? 1 : (kAtomic ? 2 : 4);
template <class Policy, bool kAtomic = false>
constexpr int kSharedSlices = sizeof(typename Policy::Acc) == 8 || !kAtomic ? 0 : 2;

// Columns of D per backward block, and how many such blocks cover D.
template <class Policy, bool kAtomic = false>
constexpr int64_t kSpan = int64_t{kTile} * (kSlices<Policy, kAtomic> + kSharedSlices<Policy, kAtomic>);

template <class Policy, bool kAtomic = false>
unsigned spans(int64_t d) {
  return static_cast<unsigned>((d + kSpan<Policy, kAtomic> - 1) / kSpan<Policy, kAtomic>);
}

// How many of the kSharedSlices a block uses at this D (the widest span's slices past the registers' ones).
template <class Policy, bool kAtomic = false>
constexpr int shared_slices_used(int64_t d) {
  const int64_t widest = d < kSpan<Policy, kAtomic> ? d : kSpan<Policy, kAtomic>;
  const int64_t past = blocks(widest) - kSlices<Policy, kAtomic>;
  return past <= 0 ? 0 : static_cast<int>(past);
}

// Dynamic shared memory of one block, in regions that each start 128-byte aligned. Rows are padded as the tile policy
// says (tile_mma.cuh): WMMA's leading dimensions legal, and a warp's accesses on distinct banks.
template <class Policy>
struct SharedLayout {
  using Operand = typename Policy::Operand;
  using Acc = typename Policy::Acc;
  static constexpr int kChunkLd = kChunk + Policy::kChunkPad;
  static constexpr int kTileLd = kTile + Policy::kTilePad;
  static constexpr int kAccLd = kTile + Policy::kAccPad;
  // Where a tile row's stride is a multiple of 4 banks (WMMA's 16-byte pads), the epilogue's 16 rows of a warp would
  // meet in 8 banks: rows 8..15 of the warp start this many columns later (epilogue_column).
  static constexpr int kEpilogueSkew = kAccLd * static_cast<int>(sizeof(Acc)) / 4 % 4 == 0 ? 2 : 0;
  static constexpr int kScaleRows = 3;      // RowScale's inverse, squared length and radial flag
  static constexpr int kRowStateRows = 9;   // upstream gradients g1..g3, statistics 0..2, the RowScale

  static constexpr int kStages = Policy::kStages;  // buffers of each chunk (tile_mma.cuh)
  static constexpr int64_t kChunkBytes = align128(kTile * kChunkLd * sizeof(Operand));
  static constexpr int64_t kXChunk = 0;
  static constexpr int64_t kYChunk = kXChunk + kStages * kChunkBytes;
  static constexpr int64_t kS = kYChunk + kStages * kChunkBytes;
  static constexpr int64_t kRowLabels = kS + align128(kTile * kAccLd * sizeof(Acc));
  static constexpr int64_t kColLabels = kRowLabels + align128(kTile * sizeof(int64_t));
  static constexpr int64_t kColScales = kColLabels + align128(kTile * sizeof(int64_t));
  static constexpr int64_t kRowState = kColScales + align128(kScaleRows * kTile * sizeof(Acc));
  static constexpr int64_t kDs = kRowState + align128(kRowStateRows * kTile * sizeof(Acc));
  static constexpr int64_t kOut = kDs + align128(kTile * kTileLd * sizeof(Operand));
  static constexpr int64_t kSums = kOut + align128(kTile * kTileLd * sizeof(Operand));
  static constexpr int64_t kOutRows = kSums + align128(kTile * sizeof(Acc));
  static constexpr int64_t kAccumulatorSlices = kOutRows + align128(kTile * kTileLd * sizeof(Operand));
  static constexpr int64_t kAccumulatorSliceBytes = align128(kTile * kAccLd * sizeof(Acc));

  // A block's 64 rows (or columns) at the whole of D up to kSpan (256; fp64 64), resident in shared memory for all of
  // its tiles where keeps_resident says so: a region of their own before the others (block_shared).
  static constexpr int kResidentWidth = static_cast<int>(kSpan<Policy>);
  static constexpr int kResidentLd = kResidentWidth + Policy::kChunkPad;  // the chunks' pad: the same banks
  static constexpr int64_t kResidentBytes = align128(kTile * kResidentLd * sizeof(Operand));

  // What each kernel uses (plus kResidentBytes where it keeps its rows resident): the forward and the selection stop
  // before dS; only the atomic dX pass needs kOutRows and its accumulator slices past the registers' (as many as D
  // needs).
  static constexpr int64_t kForwardBytes = kDs;
  static constexpr int64_t kBackwardBytes = kOutRows;
  static constexpr int64_t atomic_backward_bytes(int64_t d) {
    return kAccumulatorSlices + shared_slices_used<Policy, true>(d) * kAccumulatorSliceBytes;
  }

  // The regions are offsets from this one pointer, computed where they are used (the resident rows precede it).
  unsigned char* base;

  __device__ explicit SharedLayout(unsigned char* bytes) : base(bytes) {}

  template <class T>
  __device__ T* at(int64_t offset) const {
    return reinterpret_cast<T*>(base + offset);
  }
  // stage `stage` of the 64 x kChunk rows of X (padded to kChunkLd), and of Y
  __device__ Operand* x_chunk(int stage) const { return at<Operand>(kXChunk + stage * kChunkBytes); }
  __device__ Operand* y_chunk(int stage) const { return at<Operand>(kYChunk + stage * kChunkBytes); }
  // the 64 x 64 S tile (kAccLd); also where accumulators are staged for global writes
  __device__ Acc* s() const { return at<Acc>(kS); }
  __device__ int64_t* row_labels() const { return at<int64_t>(kRowLabels); }  // labels of the tile's rows
  __device__ int64_t* col_labels() const { return at<int64_t>(kColLabels); }  // labels of the tile's columns
  // 3 x 64: the RowScale of the tile's columns (inverse, squared length, radial as 0 / 1)
  __device__ Acc* col_scales() const { return at<Acc>(kColScales); }
  // 9 x 64: upstream gradients g1, g2, g3, statistics 0..2 and the RowScale of the tile's rows
  __device__ Acc* row_state() const { return at<Acc>(kRowState); }
  __device__ Operand* ds() const { return at<Operand>(kDs); }  // the 64 x 64 dS tile, as an MMA operand (kTileLd)
  // 64 x 64 of Y (dX pass) or X (dY pass) at the output's D columns
  __device__ Operand* out() const { return at<Operand>(kOut); }
  // 64 row or column coefficients of the rows' own direction in their gradients
  __device__ Acc* sums() const { return at<Acc>(kSums); }
  // atomic dX pass: 64 x 64 of X at the output's D columns, for dY = dS^T X
  __device__ Operand* out_rows() const { return at<Operand>(kOutRows); }
  // where the block keeps them resident: its 64 rows (or columns) at D columns 0 .. kResidentWidth (kResidentLd)
  __device__ Operand* resident_rows() const { return at<Operand>(-kResidentBytes); }
  // atomic dX pass: the 64 x 64 accumulators (kAccLd) of its slices past the registers' (kSharedSlices)
  __device__ Acc* accumulator_slice(int slice) const {
    return at<Acc>(kAccumulatorSlices + slice * kAccumulatorSliceBytes);
  }
};

// dst[64 x width] (leading dimension ld) = src[row0 :, col0 :] with zeros past rows_total / cols_total.
template <class T>
__device__ __forceinline__ void load_tile(T* dst, int ld, int width, const T* src, int64_t stride, int64_t row0,
                                          int64_t rows_total, int64_t col0, int64_t cols_total) {
  for (int index = threadIdx.x; index < kTile * width; index += kThreads) {
    const int r = index / width, c = index % width;
    const int64_t row = row0 + r, col = col0 + c;
    dst[r * ld + c] = (row < rows_total && col < cols_total) ? src[row * stride + col] : T(0.0f);
  }
}

// The widest asynchronous copy (16, 8 or 4 bytes) that rows of T at `rows` (row stride `stride` elements) and shared
// rows `ld` elements apart are both aligned to, for tiles starting at columns that are multiples of 32; 0 where
// none is (2-byte rows at odd offsets or strides): such tiles are loaded by plain loads and stores.
template <class T>
__device__ __forceinline__ int async_copy_bytes(const T* rows, int64_t stride, int ld) {
  for (int bytes = 16; bytes >= 4 && bytes >= static_cast<int>(sizeof(T)); bytes /= 2) {
    if (reinterpret_cast<uintptr_t>(rows) % bytes == 0 && stride * static_cast<int64_t>(sizeof(T)) % bytes == 0 &&
        ld * static_cast<int>(sizeof(T)) % bytes == 0)
      return bytes;
  }
  return 0;
}

// load_tile's tile by asynchronous copies (cp.async, zero-filled past rows_total / cols_total; a plain load_tile where
// async_copy_bytes finds no common alignment). The caller commits them (__pipeline_commit) and waits for them
// (__pipeline_wait_prior) before the barrier after which the tile is read. width: a multiple of 8.
template <class T>
__device__ __forceinline__ void load_tile_async(T* dst, int ld, int width, const T* src, int64_t stride, int64_t row0,
                                                int64_t rows_total, int64_t col0, int64_t cols_total) {
  const int bytes = async_copy_bytes(src, stride, ld);
  if (bytes == 0) {
    load_tile(dst, ld, width, src, stride, row0, rows_total, col0, cols_total);
    return;
  }
  const int per_copy = bytes / static_cast<int>(sizeof(T)), copies_per_row = width / per_copy;
  for (int index = threadIdx.x; index < kTile * copies_per_row; index += kThreads) {
    const int r = index / copies_per_row, c = (index % copies_per_row) * per_copy;
    const int64_t row = row0 + r, col = col0 + c;
    const int64_t in_range = row < rows_total ? cols_total - col : 0;
    const int valid = in_range <= 0 ? 0 : (in_range >= per_copy ? per_copy : static_cast<int>(in_range));
    __pipeline_memcpy_async(dst + r * ld + c, valid > 0 ? src + row * stride + col : src, bytes,
                            (per_copy - valid) * sizeof(T));
  }
}

// Starts the asynchronous copies issued so far and waits for all of them (the caller's barrier then publishes them).
__device__ __forceinline__ void finish_async_copies() {
  __pipeline_commit();
  __pipeline_wait_prior(0);
}

__device__ __forceinline__ void load_labels(int64_t* dst, const int64_t* labels, int64_t start, int64_t total) {
  if (threadIdx.x < kTile) {
    const int64_t index = start + threadIdx.x;
    dst[threadIdx.x] = index < total ? labels[index] : 0;
  }
}

// dst[64 x width] (leading dimension ld) = the transpose of src[row0 :, col0 :], src's rows read along: element
// (j, k) is src[(row0 + k) * stride + col0 + j] (a D x J matrix read as J x D: the classifiers' W), zeros past
// rows_total (D) and cols_total (J). Consecutive threads read consecutive columns of src.
template <class T>
__device__ __forceinline__ void load_transposed_tile(T* dst, int ld, int width, const T* src, int64_t stride,
                                                     int64_t row0, int64_t rows_total, int64_t col0,
                                                     int64_t cols_total) {
  for (int index = threadIdx.x; index < kTile * width; index += kThreads) {
    const int j = index % kTile, k = index / kTile;
    const int64_t row = row0 + k, col = col0 + j;
    dst[j * ld + k] = (row < rows_total && col < cols_total) ? src[row * stride + col] : T(0.0f);
  }
}

// Which operand of a product tile the block holds resident in shared memory (shared.resident_rows()).
enum class Resident { kNone, kRows, kColumns };

// shared.s() = A B^T of two 64-row operands accumulated over D in kChunk steps: load_chunks(d0, stage) fills
// shared.x_chunk(stage) and shared.y_chunk(stage), or the one of them whose operand is not resident, with their
// columns d0 .. d0 + kChunk, by asynchronous copies (load_tile_async) or plain stores; a resident operand is read from
// shared.resident_rows() (loaded by load_resident_rows). With two stages the next chunk's copies are in flight during
// this chunk's product. Ends synchronised.
template <class Policy, class LoadChunks>
__device__ void product_tile(int64_t d, SharedLayout<Policy>& shared, LoadChunks&& load_chunks,
                             Resident resident = Resident::kNone) {
  using Layout = SharedLayout<Policy>;
  using Operand = typename Policy::Operand;
  constexpr int kStages = Layout::kStages;
  typename Policy::Accumulator acc;
  Policy::zero(acc);
  if (d > 0) {
    load_chunks(int64_t{0}, 0);
    __pipeline_commit();
  }
  const int lda = resident == Resident::kRows ? Layout::kResidentLd : Layout::kChunkLd;
  const int ldb = resident == Resident::kColumns ? Layout::kResidentLd : Layout::kChunkLd;
  int stage = 0;
  for (int64_t d0 = 0; d0 < d; d0 += kChunk) {
    const bool more = d0 + kChunk < d;
    if (kStages > 1 && more) {
      load_chunks(d0 + kChunk, stage ^ 1);
      __pipeline_commit();
      __pipeline_wait_prior(1);
    } else {
      __pipeline_wait_prior(0);
    }
    __syncthreads();
    const Operand* a = resident == Resident::kRows ? shared.resident_rows() + d0 : shared.x_chunk(stage);
    const Operand* b = resident == Resident::kColumns ? shared.resident_rows() + d0 : shared.y_chunk(stage);
    // B = Y^T: element (k, j) is Y[j][k], a column-major read of Y's rows
    Policy::template mma<RowMajor, ColMajor>(acc, a, lda, b, ldb, kChunk);
    __syncthreads();
    if (kStages == 1 && more) {
      load_chunks(d0 + kChunk, 0);
      __pipeline_commit();
    }
    if (kStages > 1) stage ^= 1;
  }
  Policy::store(acc, shared.s(), Layout::kAccLd);
  __syncthreads();
}

// shared.resident_rows() = rows[row0 : row0 + 64, 0 : d] (d <= kResidentWidth; zeros past rows_total and up to the
// next multiple of 64, the backward's slices), waited for; the next barrier (product_tile's) publishes it.
template <class Policy>
__device__ void load_resident_rows(const typename Policy::Operand* rows, int64_t stride, int64_t row0,
                                   int64_t rows_total, int64_t d, SharedLayout<Policy>& shared) {
  const int width = static_cast<int>(blocks(d) * kTile);
  load_tile_async(shared.resident_rows(), SharedLayout<Policy>::kResidentLd, width, rows, stride, row0, rows_total,
                  int64_t{0}, d);
  finish_async_copies();
}

// Whether a kernel whose other regions take `bytes` of shared memory keeps its block's rows (or columns) resident:
// D within the resident width and the larger shared memory allowed on the current device (else it loads their
// chunks with every tile). The launch then asks for resident_bytes(bytes, true).
template <class Policy>
bool keeps_resident(int64_t d, int64_t bytes) {
  return d <= SharedLayout<Policy>::kResidentWidth &&
         bytes + SharedLayout<Policy>::kResidentBytes <= shared_bytes_of_current_device();
}

template <class Policy>
int64_t resident_bytes(int64_t bytes, bool resident) {
  return bytes + (resident ? SharedLayout<Policy>::kResidentBytes : 0);
}

// shared.s() = X[r0 : r0 + 64] . Y[c0 : c0 + 64]^T (X's rows or Y's from shared.resident_rows() as `resident`
// says). Ends synchronised.
template <class Policy>
__device__ void similarity_tile(const CudaPairRowsParams& p, int64_t r0, int64_t c0, SharedLayout<Policy>& shared,
                                Resident resident = Resident::kNone) {
  using Layout = SharedLayout<Policy>;
  using Operand = typename Policy::Operand;
  const auto* x = static_cast<const Operand*>(p.x);
  const auto* y = static_cast<const Operand*>(p.y);
  product_tile<Policy>(p.d, shared, [&](int64_t d0, int stage) {
    if (resident != Resident::kRows)
      load_tile_async(shared.x_chunk(stage), Layout::kChunkLd, kChunk, x, p.x_stride, r0, p.n, d0, p.d);
    if (resident != Resident::kColumns)
      load_tile_async(shared.y_chunk(stage), Layout::kChunkLd, kChunk, y, p.y_stride, c0, p.m, d0, p.d);
  }, resident);
}

// How a row enters the pair values when the kernels fold in the normalisation (params.h, CudaPairRowsParams):
// s_ij = (x_i . y_j) r_i r_j with r = 1 / max(|row|, eps) and |u|^2 = (|row| r)^2 the scaled row's squared length;
// radial where the clamp is inactive (the normalisation's Jacobian then removes the row's own direction). Without
// normalising, r = 1, |u|^2 = |row|^2 and nothing is radial.
template <class Acc>
struct RowScale {
  Acc inverse;
  Acc length2;
  bool radial;
};

// Whether a row of this norm is normalised along its direction (its norm above eps: the normalisation's Jacobian then
// removes the row's own direction), and its inverse norm 1 / max(norm, eps).
template <class Acc>
__host__ __device__ __forceinline__ bool is_radial(Acc norm) {
  return norm > Acc(kNormEps);
}
template <class Acc>
__host__ __device__ __forceinline__ Acc inverse_norm(Acc norm) {
  return Acc(1) / (is_radial(norm) ? norm : Acc(kNormEps));
}

// The RowScale of entry `index` of the squared row norms `sq` (nullptr: 0, where nothing needs them).
template <class Acc>
__device__ __forceinline__ RowScale<Acc> row_scale(const void* sq, int64_t index, bool normalize) {
  const Acc squared = sq != nullptr ? static_cast<const Acc*>(sq)[index] : Acc(0);
  if (!normalize) return {Acc(1), squared, false};
  const Acc norm = std::sqrt(squared);
  const bool radial = is_radial(norm);
  const Acc inverse = inverse_norm(norm);
  // (|row| r)^2 rather than |row|^2 r^2: |row| (1 / |row|) rounds to 1 for most rows, so unit rows' distances tie
  // exactly where they do in exact arithmetic (batch-hard's choices among them go to the lowest index, as the
  // reference's and the Triton kernels')
  const Acc length = norm * inverse;
  return {inverse, length * length, radial};
}

// Entry i of a tile's RowScales in shared memory, three rows of 64 (inverse, squared length, radial as 0 / 1) from
// `rows`: the columns' (SharedLayout::col_scales) and the rows' (within row_state).
template <class Acc>
__device__ __forceinline__ void store_row_scale(Acc* rows, int i, const RowScale<Acc>& scale) {
  rows[i] = scale.inverse;
  rows[kTile + i] = scale.length2;
  rows[2 * kTile + i] = scale.radial ? Acc(1) : Acc(0);
}
template <class Acc>
__device__ __forceinline__ RowScale<Acc> stored_row_scale(const Acc* rows, int i) {
  return {rows[i], rows[kTile + i], rows[2 * kTile + i] != 0};
}

// Threads t < 64: the RowScale of the tile's column t (reference c0 + t; r = 1 past M) into shared.col_scales().
template <class Policy>
__device__ __forceinline__ void load_column_scales(const CudaPairRowsParams& p, int64_t c0,
                                                   SharedLayout<Policy>& shared) {
  using Acc = typename Policy::Acc;
  if (threadIdx.x < kTile) {
    const int64_t column = c0 + threadIdx.x;
    store_row_scale(shared.col_scales(), threadIdx.x,
                    column < p.m ? row_scale<Acc>(p.y_sq, column, p.normalize) : RowScale<Acc>{1, 0, false});
  }
}

// Column j's RowScale as load_column_scales left it.
template <class Policy>
__device__ __forceinline__ RowScale<typename Policy::Acc> column_scale(const SharedLayout<Policy>& shared, int j) {
  return stored_row_scale(shared.col_scales(), j);
}

// out[i] = |v_i|^2 (kInverse: 1 / max(|v_i|, eps)) of `count` vectors of `length` elements, element k of vector i
// at data[i * count_stride + k * length_stride] (rows: (stride, 1); W's columns: (1, w_stride), coalesced), summed
// in the accumulation type from the rows as stored: no converted copy of the rows.
template <class T, class Acc, bool kInverse>
__global__ void __launch_bounds__(kThreads) vector_norms_kernel(const T* data, int64_t count, int64_t length,
                                                                int64_t count_stride, int64_t length_stride,
                                                                Acc* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= count) return;
  Acc sum = 0;
  for (int64_t k = 0; k < length; ++k) {
    const Acc value = static_cast<Acc>(data[i * count_stride + k * length_stride]);
    sum += value * value;
  }
  if (kInverse) {
    out[i] = inverse_norm(std::sqrt(sum));
  } else {
    out[i] = sum;
  }
}

// The epilogues' split of a tile: this thread's row within the tile and its first column (then every second one).
__host__ __device__ constexpr int epilogue_row_of(int thread) { return thread >> 1; }
__device__ __forceinline__ int epilogue_row() { return epilogue_row_of(threadIdx.x); }
__device__ __forceinline__ int epilogue_column() { return threadIdx.x & 1; }

// The k-th (k < 32) of a thread's columns of its tile row in the order the epilogues visit them: its half of the
// columns, rotated by the layout's skew in rows 8..15 of each warp (SharedLayout::kEpilogueSkew).
template <class Policy>
__host__ __device__ constexpr int epilogue_column_of(int thread, int k) {
  const int skew = (epilogue_row_of(thread) & 8) ? SharedLayout<Policy>::kEpilogueSkew : 0;
  return ((thread & 1) + 2 * k + skew) & (kTile - 1);
}
template <class Policy>
__device__ __forceinline__ int epilogue_column(int k) {
  return epilogue_column_of<Policy>(threadIdx.x, k);
}

// The query row this thread folds in a row-block kernel (block blockIdx.x, rows r0 ..).
template <class Acc>
struct QueryRow {
  int64_t r0;            // the block's first row
  int local;             // this thread's row within the tile
  int64_t row;           // r0 + local
  bool live;             // row < N
  int64_t label;         // its label (0 past N)
  RowScale<Acc> scale;   // how it enters the pair values
};

template <class Acc>
__device__ __forceinline__ QueryRow<Acc> query_row(const CudaPairRowsParams& p) {
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int local = epilogue_row();
  const bool live = r0 + local < p.n;
  return {r0, local, r0 + local, live, live ? p.x_labels[r0 + local] : 0,
          live ? row_scale<Acc>(p.x_sq, r0 + local, p.normalize) : RowScale<Acc>{1, 0, false}};
}

// The block's dynamic shared memory, 128-byte aligned.
template <class T>
__device__ __forceinline__ T* dynamic_shared() {
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  return reinterpret_cast<T*>(shared_bytes);
}

// The same, carved into the regions of SharedLayout, after the resident rows where the block keeps them.
template <class Policy>
__device__ __forceinline__ SharedLayout<Policy> block_shared(bool resident = false) {
  return SharedLayout<Policy>(dynamic_shared<unsigned char>() + (resident ? SharedLayout<Policy>::kResidentBytes : 0));
}

// What for_each_row_pair does after a tile's pairs by default: nothing.
struct NoTileEnd {
  __device__ __forceinline__ void operator()(int64_t, int) const {}
};

// The row pass of a forward epilogue (the rows resident in shared memory where `resident`): walks the column tiles of
// the block's rows and calls visit(s, column_length2, column, positive, negative) on each pair of this thread's row
// (its half of the columns, in epilogue_column's order: not ascending), s the scaled product (x_i . y_j) r_i r_j and
// column_length2 the reference's |u|^2, then tile_end(c0, cols) in every thread, live row or not, with the tile's S,
// labels and scales still in shared memory (a pass over the whole tile row may synchronise there). Every thread of
// the block calls it (it synchronises); the caller then meets its partner thread through from_partner.
template <class Policy, class Visit, class TileEnd = NoTileEnd>
__device__ __forceinline__ void for_each_row_pair(const CudaPairRowsParams& p, const QueryRow<typename Policy::Acc>& query,
                                                  SharedLayout<Policy>& shared, bool resident, Visit&& visit,
                                                  TileEnd&& tile_end = {}) {
  if (resident) load_resident_rows(static_cast<const typename Policy::Operand*>(p.x), p.x_stride, query.r0, p.n, p.d,
                                   shared);
  for (int64_t c0 = 0; c0 < p.m; c0 += kTile) {
    load_labels(shared.col_labels(), p.y_labels, c0, p.m);
    load_column_scales(p, c0, shared);
    similarity_tile<Policy>(p, query.r0, c0, shared, resident ? Resident::kRows : Resident::kNone);
    const int cols = static_cast<int>(p.m - c0 < kTile ? p.m - c0 : kTile);
    if (query.live) {
#pragma unroll 1
      for (int k = 0; k < kTile / 2; ++k) {
        const int j = epilogue_column<Policy>(k);
        if (j >= cols) continue;
        bool positive, negative;
        pair_kind(query.label, shared.col_labels()[j], query.row, c0 + j, p.self_offset, positive, negative);
        const auto column = column_scale(shared, j);
        visit(shared.s()[query.local * SharedLayout<Policy>::kAccLd + j] * query.scale.inverse * column.inverse,
              column.length2, c0 + j, positive, negative);
      }
    }
    tile_end(c0, cols);
    __syncthreads();  // the next tile rewrites S, the labels and the scales
  }
}

// Thread t < 64: the sum of column t of the S tile (the gradients' epilogues leave their column shares there).
// Between the barrier after they are written and the next write of S.
template <class Policy>
__device__ __forceinline__ typename Policy::Acc column_sum(const SharedLayout<Policy>& shared) {
  typename Policy::Acc sum = 0;
#pragma unroll 1
  for (int i = 0; i < kTile; ++i) sum += shared.s()[i * SharedLayout<Policy>::kAccLd + threadIdx.x];
  return sum;
}

// out[row0 + i, e0 + j] (= or +=, or atomically +=) the 64 x 64 tile `tile` in shared memory (kAccLd: shared.s(),
// or an accumulator slice) times `unscale`, within rows_total x d, minus the radial or norm term coefficients[i] times
// the gradient's own row, own[i * own_ld + j] (own: those rows at D columns e0..; coefficients nullptr: no such term).
enum class Write { kStore, kAdd, kAtomicAdd };

template <class Policy>
struct OwnRowTerm {
  const typename Policy::Acc* coefficients = nullptr;  // nullptr: none
  const typename Policy::Operand* own = nullptr;
  int64_t own_ld = 0;
};

template <class Policy>
__device__ void write_tile(typename Policy::Acc* out, int64_t row0, int64_t rows_total, int64_t e0, int64_t d,
                           Write mode, const typename Policy::Acc* tile, const OwnRowTerm<Policy>& term = {},
                           typename Policy::Acc unscale = 1) {
  using Acc = typename Policy::Acc;
#pragma unroll 1
  for (int index = threadIdx.x; index < kTile * kTile; index += kThreads) {
    const int i = index / kTile, j = index % kTile;
    const int64_t row = row0 + i, col = e0 + j;
    if (row >= rows_total || col >= d) continue;
    Acc value = tile[i * SharedLayout<Policy>::kAccLd + j] * unscale;
    if (term.coefficients != nullptr) value -= term.coefficients[i] * static_cast<Acc>(term.own[i * term.own_ld + j]);
    auto* target = out + row * d + col;
    if (mode == Write::kAtomicAdd) {
      atomicAdd(target, value);
    } else {
      *target = mode == Write::kAdd ? *target + value : value;
    }
  }
}

// multiply(slice) for each 64-wide slice of the block's span of D (e0 = span0 + 64 slice < d), after
// load_slice(e0) has filled shared.out() and a barrier has published it.
template <int kCount, class LoadSlice, class Multiply>
__device__ __forceinline__ void for_each_slice(int64_t span0, int64_t d, LoadSlice&& load_slice, Multiply&& multiply) {
#pragma unroll
  for (int slice = 0; slice < kCount; ++slice) {
    const int64_t e0 = span0 + slice * kTile;
    if (e0 >= d) break;
    __syncthreads();
    load_slice(e0);
    finish_async_copies();
    __syncthreads();
    multiply(slice);
  }
}

// The backward's products with the block's span of D: acc[slice] += op(P) B for each 64-wide slice, e0 = span0 +
// 64 slice < d, where load_slice(e0) fills shared.out() with B's 64 rows at those D columns (asynchronous copies or
// plain stores) and P is shared.ds(), read transposed when LayoutP is ColMajor. Begins with a barrier (the tile's
// writers of dS and previous readers of out are done); the last slice's product may still be reading when it returns.
template <class LayoutP, class Policy, int kCount, class LoadSlice>
__device__ __forceinline__ void accumulate_slices(typename Policy::Accumulator (&acc)[kCount],
                                                  const SharedLayout<Policy>& shared, int64_t span0, int64_t d,
                                                  LoadSlice&& load_slice) {
  using Layout = SharedLayout<Policy>;
  for_each_slice<kCount>(span0, d, load_slice, [&](int slice) {
    Policy::template mma<LayoutP, RowMajor>(acc[slice], shared.ds(), Layout::kTileLd, shared.out(), Layout::kTileLd,
                                            kTile);
  });
}

// accumulate_slices for the slices whose accumulators live in shared memory (shared.accumulator_slice(slice), from
// span0 on), a fragment at a time.
template <class LayoutP, int kCount, class Policy, class LoadSlice>
__device__ __forceinline__ void accumulate_shared_slices(const SharedLayout<Policy>& shared, int64_t span0,
                                                         int64_t d, LoadSlice&& load_slice) {
  using Layout = SharedLayout<Policy>;
  for_each_slice<kCount>(span0, d, load_slice, [&](int slice) {
    Policy::template product_to<LayoutP, RowMajor, true>(shared.accumulator_slice(slice), Layout::kAccLd,
                                                         shared.ds(), Layout::kTileLd, shared.out(), Layout::kTileLd,
                                                         kTile);
  });
}

// Writes accumulate_slices' results: out[row0 + i, e0 + j] for each slice (write_tile's modes), times unscale, minus
// coefficients[i] (nullptr: none) times own[i * own_ld + e0 + j], own the gradient's own rows at D column 0. Starts
// after the caller's last use of shared.s(); ends synchronised.
template <class Policy, int kCount>
__device__ __forceinline__ void write_slices(const typename Policy::Accumulator (&acc)[kCount],
                                             const SharedLayout<Policy>& shared, typename Policy::Acc* out,
                                             int64_t row0, int64_t rows_total, int64_t span0, int64_t d, Write mode,
                                             const typename Policy::Acc* coefficients,
                                             const typename Policy::Operand* own, int64_t own_ld,
                                             typename Policy::Acc unscale = 1) {
#pragma unroll
  for (int slice = 0; slice < kCount; ++slice) {
    const int64_t e0 = span0 + slice * kTile;
    if (e0 >= d) break;
    Policy::store(acc[slice], shared.s(), SharedLayout<Policy>::kAccLd);
    __syncthreads();
    write_tile<Policy>(out, row0, rows_total, e0, d, mode, shared.s(), {coefficients, own + e0, own_ld}, unscale);
    __syncthreads();  // the next slice rewrites S
  }
}

template <class T>
__device__ __forceinline__ T from_partner(T value) {
  return __shfl_xor_sync(0xffffffffu, value, 1);
}

// body(Policy{}) with the tile policy of the operand type (tile_mma.cuh), or `fallback` for an unknown one.
template <class Result, class Body>
Result with_policy(Operand operand, Result fallback, Body&& body) {
  switch (operand) {
    case Operand::kFloat32: return body(SimtTile<float>{});
    case Operand::kTf32: return body(WmmaTile<Tf32>{});
    case Operand::kFloat16: return body(WmmaTile<__half>{});
    case Operand::kBFloat16: return body(WmmaTile<__nv_bfloat16>{});
    case Operand::kFloat64: return body(SimtTile<double>{});
  }
  return fallback;
}

// Launches `kernel` on `grid` blocks of kThreads threads with `bytes` of dynamic shared memory (opting in past the
// default 48 KB). cudaLaunchKernelEx rather than <<< >>>: it is plain C++, so the host emulation compiles it too.
template <class... Params, class... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, int64_t bytes, cudaStream_t stream, Args... args) {
  if (cudaError_t error =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)))
    return error;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = static_cast<size_t>(bytes);
  config.stream = stream;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

}  // namespace metric_kernels::cuda
