// CUDA kernels of batch-hard's chosen triplets, to the Triton kernels' contract
// (metric_kernels/triton/_triplet_kernel.py): the 2 N distances ||u_i - v_p(i)|| and ||u_i - v_n(i)|| of the pairs
// batch_hard.cu chose, and their backward. O(N D) work, one warp per row, and nothing of N x D but the gradients
// themselves, written in the rows' dtype.
//
// u = x r and v = y r are the rows scaled by r = 1 / max(|row|, eps) when normalising (else r = 1), formed on the fly
// from the raw rows and their squared norms. The distances are direct differences, not |u|^2 + |v|^2 - 2 u.v: exact
// for the close pairs that batch-hard picks. dY walks, per reference, the rows that chose it in the order the caller
// sorted them (params.h), so the backward is deterministic without atomics; when the references are the queries, that
// one pass also adds each row's own part as a query, so no partial dX is kept.
#ifdef METRIC_KERNELS_HOST_EMULATION
#include "host_emulation.h"
#else
#include <cuda_runtime.h>
#endif

#include "engine.cuh"
#include "launch.h"

namespace metric_kernels::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = kThreads / kWarp;

template <class Acc>
__device__ __forceinline__ Acc warp_sum(Acc value) {
  for (int lanes = kWarp / 2; lanes > 0; lanes /= 2) value += __shfl_xor_sync(0xffffffffu, value, lanes);
  return value;
}

// The warp's row (the same for its 32 lanes, so a warp past the end leaves whole, before any shuffle) and its lane.
__device__ __forceinline__ int64_t warp_row() {
  return static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
}
__device__ __forceinline__ int lane() { return static_cast<int>(threadIdx.x % kWarp); }

// A chosen index clamped into [0, count): a caller's out-of-range index reads a valid row, never memory past the rows.
__device__ __forceinline__ int64_t in_range(int64_t index, int64_t count) {
  return index < 0 ? 0 : (index >= count ? count - 1 : index);
}

// One side's rows as stored (T) with their RowScales (engine.cuh: r, and whether the normalisation is radial).
template <class T, class Acc>
struct ScaledRows {
  const T* data;
  int64_t stride;
  const void* sq;
  bool normalize;

  __device__ RowScale<Acc> scale(int64_t row) const { return row_scale<Acc>(sq, row, normalize); }
  __device__ Acc at(int64_t row, int64_t k, Acc r) const { return static_cast<Acc>(data[row * stride + k]) * r; }
};

template <class T, class Acc>
struct Sides {
  ScaledRows<T, Acc> x, y;
};

template <class T, class Acc>
__device__ __forceinline__ Sides<T, Acc> sides_of(const CudaTripletParams& p) {
  return {{static_cast<const T*>(p.x), p.x_stride, p.x_sq, p.normalize},
          {static_cast<const T*>(p.y), p.y_stride, p.y_sq, p.normalize}};
}

// Row i's two chosen references and their scales.
template <class Acc>
struct Chosen {
  int64_t positive, negative;
  RowScale<Acc> anchor, to_positive, to_negative;
};

template <class T, class Acc>
__device__ __forceinline__ Chosen<Acc> chosen(const Sides<T, Acc>& rows, const CudaTripletParams& p, int64_t i) {
  const int64_t positive = in_range(p.positive[i], p.m), negative = in_range(p.negative[i], p.m);
  return {positive, negative, rows.x.scale(i), rows.y.scale(positive), rows.y.scale(negative)};
}

// Element k of row i's gradient as a query, before the normalisation: c_p (u_i - v_p) + c_n (u_i - v_n).
template <class T, class Acc>
__device__ __forceinline__ Acc query_part(const Sides<T, Acc>& rows, const Chosen<Acc>& c, int64_t i, int64_t k,
                                          Acc to_positive, Acc to_negative) {
  const Acc u = rows.x.at(i, k, c.anchor.inverse);
  return to_positive * (u - rows.y.at(c.positive, k, c.to_positive.inverse)) +
         to_negative * (u - rows.y.at(c.negative, k, c.to_negative.inverse));
}

template <class T, class Acc>
__global__ void __launch_bounds__(kThreads) triplet_distances_kernel(const CudaTripletParams p, Acc* out) {
  const int64_t i = warp_row();
  if (i >= p.n) return;
  const Sides<T, Acc> rows = sides_of<T, Acc>(p);
  const Chosen<Acc> c = chosen(rows, p, i);
  Acc to_positive = 0, to_negative = 0;
  for (int64_t k = lane(); k < p.d; k += kWarp) {
    const Acc u = rows.x.at(i, k, c.anchor.inverse);
    const Acc a = u - rows.y.at(c.positive, k, c.to_positive.inverse);
    const Acc b = u - rows.y.at(c.negative, k, c.to_negative.inverse);
    to_positive += a * a;
    to_negative += b * b;
  }
  to_positive = warp_sum(to_positive);
  to_negative = warp_sum(to_negative);
  if (lane() == 0) {
    out[i] = std::sqrt(to_positive);
    out[p.n + i] = std::sqrt(to_negative);
  }
}

// A warp walks D in chunks of kChunkWidth, a lane's elements of a chunk (k = d0 + lane + kWarp r, r < kPerLane) in
// registers, so that what is per row or per chooser (its scale, its coefficient) is read once per chunk, not once per
// element: D up to 256 is one chunk.
constexpr int kPerLane = 8;
constexpr int64_t kChunkWidth = int64_t{kWarp} * kPerLane;

__device__ __forceinline__ int64_t lane_element(int64_t d0, int r) { return d0 + lane() + int64_t{kWarp} * r; }

// Writes r (g - (g . w) w) for a radial row of scaled values w (else r g) over D, where gradient_chunk(d0, g) fills
// g[r] with the gradient's elements lane_element(d0, r) (those below d): the normalisation's Jacobian, its radial term
// summed in a first sweep (the one chunk of D up to kChunkWidth kept for the second; wider D recomputed).
template <class Acc, class Out, class GradientChunk, class Scaled>
__device__ __forceinline__ void write_through_normalisation(Out* out, int64_t d, const RowScale<Acc>& scale,
                                                            GradientChunk&& gradient_chunk, Scaled&& scaled) {
  Acc g[kPerLane];
  Acc radial = 0;
  if (scale.radial) {
    for (int64_t d0 = 0; d0 < d; d0 += kChunkWidth) {
      gradient_chunk(d0, g);
#pragma unroll
      for (int r = 0; r < kPerLane; ++r)
        if (lane_element(d0, r) < d) radial += scaled(lane_element(d0, r)) * g[r];
    }
    radial = warp_sum(radial);
  }
  for (int64_t d0 = 0; d0 < d; d0 += kChunkWidth) {
    if (!scale.radial || d > kChunkWidth) gradient_chunk(d0, g);
#pragma unroll
    for (int r = 0; r < kPerLane; ++r) {
      const int64_t k = lane_element(d0, r);
      if (k < d)
        out[k] = static_cast<Out>(scale.radial ? scale.inverse * (g[r] - radial * scaled(k)) : scale.inverse * g[r]);
    }
  }
}

// dX of the queries (the references are other rows): row i's query part, through its normalisation.
template <class T, class Acc>
__global__ void __launch_bounds__(kThreads) triplet_backward_rows_kernel(const CudaTripletBackwardParams bp) {
  const CudaTripletParams& p = bp.rows;
  const int64_t i = warp_row();
  if (i >= p.n) return;
  const Sides<T, Acc> rows = sides_of<T, Acc>(p);
  const Chosen<Acc> c = chosen(rows, p, i);
  const auto* coefficients = static_cast<const Acc*>(bp.coefficients);
  const Acc to_positive = coefficients[i], to_negative = coefficients[p.n + i];
  write_through_normalisation<Acc, T>(
      static_cast<T*>(bp.dx) + i * p.d, p.d, c.anchor,
      [&](int64_t d0, Acc (&g)[kPerLane]) {
#pragma unroll
        for (int r = 0; r < kPerLane; ++r) {
          const int64_t k = lane_element(d0, r);
          g[r] = k < p.d ? query_part(rows, c, i, k, to_positive, to_negative) : Acc(0);
        }
      },
      [&](int64_t k) { return rows.x.at(i, k, c.anchor.inverse); });
}

// dY of reference j: the sum over the entries (i, c) that chose it of c (v_j - u_i), in the caller's order, through
// j's normalisation. kSame (the references are the queries): row j's own query part joins the sum and the result is
// its whole gradient, written to dx.
template <class T, class Acc, bool kSame>
__global__ void __launch_bounds__(kThreads) triplet_backward_references_kernel(const CudaTripletBackwardParams bp) {
  const CudaTripletParams& p = bp.rows;
  const int64_t j = warp_row();
  if (j >= p.m) return;
  const Sides<T, Acc> rows = sides_of<T, Acc>(p);
  const auto* coefficients = static_cast<const Acc*>(bp.coefficients);
  const RowScale<Acc> scale = rows.y.scale(j);
  const int64_t start = bp.offsets[j], stop = bp.offsets[j + 1];
  // kSame: row j as a query (its chosen pairs and coefficients), read once
  Chosen<Acc> own{};
  Acc own_positive = 0, own_negative = 0;
  if (kSame) {
    own = chosen(rows, p, j);
    own_positive = coefficients[j], own_negative = coefficients[p.n + j];
  }
  const auto gradient_chunk = [&](int64_t d0, Acc (&g)[kPerLane]) {
    Acc v[kPerLane];
#pragma unroll
    for (int r = 0; r < kPerLane; ++r) {
      const int64_t k = lane_element(d0, r);
      v[r] = k < p.d ? rows.y.at(j, k, scale.inverse) : Acc(0);
      g[r] = kSame && k < p.d ? query_part(rows, own, j, k, own_positive, own_negative) : Acc(0);
    }
    for (int64_t entry = start; entry < stop; ++entry) {
      const int64_t chooser = bp.order[entry];
      const int64_t i = chooser % p.n;
      const Acc c = coefficients[chooser], inverse = rows.x.scale(i).inverse;
#pragma unroll
      for (int r = 0; r < kPerLane; ++r) {
        const int64_t k = lane_element(d0, r);
        if (k < p.d) g[r] += c * (v[r] - rows.x.at(i, k, inverse));
      }
    }
  };
  write_through_normalisation<Acc, T>(static_cast<T*>(kSame ? bp.dx : bp.dy) + j * p.d, p.d, scale, gradient_chunk,
                                      [&](int64_t k) { return rows.y.at(j, k, scale.inverse); });
}

dim3 warp_blocks(int64_t rows) { return dim3(static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock)); }

template <class T, class Acc>
cudaError_t backward(const CudaTripletBackwardParams& bp, cudaStream_t stream) {
  const CudaTripletParams& p = bp.rows;
  if (bp.same) return launch(triplet_backward_references_kernel<T, Acc, true>, warp_blocks(p.m), 0, stream, bp);
  if (bp.dx != nullptr) {
    if (cudaError_t error = launch(triplet_backward_rows_kernel<T, Acc>, warp_blocks(p.n), 0, stream, bp)) return error;
  }
  if (bp.dy != nullptr)
    return launch(triplet_backward_references_kernel<T, Acc, false>, warp_blocks(p.m), 0, stream, bp);
  return cudaSuccess;
}

}  // namespace

int triplet_distances(const CudaTripletParams& p, void* out, void* stream) {
  if (p.n == 0) return cudaSuccess;
  if (p.m == 0) return cudaErrorInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  return with_policy(p.operand, cudaErrorInvalidValue, [&](auto policy) {
    using Policy = decltype(policy);
    using Acc = typename Policy::Acc;
    return launch(triplet_distances_kernel<typename Policy::Operand, Acc>, warp_blocks(p.n), 0, s, p,
                  static_cast<Acc*>(out));
  });
}

int triplet_distances_backward(const CudaTripletBackwardParams& bp, void* stream) {
  const CudaTripletParams& p = bp.rows;
  if (p.n == 0 || p.m == 0 || p.d == 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  return with_policy(p.operand, cudaErrorInvalidValue, [&](auto policy) {
    using Policy = decltype(policy);
    return backward<typename Policy::Operand, typename Policy::Acc>(bp, s);
  });
}

}  // namespace metric_kernels::cuda
