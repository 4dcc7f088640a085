// CUDA selection of batch-hard triplets on the engine of engine.cuh: per query, the farthest positive and the
// nearest negative by squared distance |x|^2 + |y|^2 - 2 s, ties to the lowest index (as the CPU kernel and the
// reference). Only the indices leave the kernel; the loss and its O(N D) backward are computed on the chosen pairs.
#include <cuda_runtime.h>

#include <limits>

#include "engine.cuh"
#include "launch.h"

namespace metric_kernels::cuda {
namespace {

// Keeps (value, index) when better, or equal with a lower index; index -1 is "none yet".
template <bool kLarger, class T>
__device__ __forceinline__ void keep_better(T& value, int64_t& index, T other, int64_t other_index) {
  if (other_index < 0) return;
  const bool better = kLarger ? other > value : other < value;
  if (index < 0 || better || (other == value && other_index < index)) value = other, index = other_index;
}

template <class Policy>
__global__ void __launch_bounds__(kThreads, 2) batch_hard_select_kernel(const CudaPairRowsParams p,
                                                                       const typename Policy::Acc* x_sq,
                                                                       const typename Policy::Acc* y_sq,
                                                                       int64_t* choices) {
  using Acc = typename Policy::Acc;
  using Layout = SharedLayout<Policy>;
  Layout shared = block_shared<Policy>();
  const auto [r0, local, row, live, label] = query_row(p);
  const Acc row_sq = live ? x_sq[row] : Acc(0);
  Acc far = -std::numeric_limits<Acc>::infinity(), near = std::numeric_limits<Acc>::infinity();
  int64_t far_at = -1, near_at = -1;
  for (int64_t c0 = 0; c0 < p.m; c0 += kTile) {
    load_labels(shared.col_labels, p.y_labels, c0, p.m);
    similarity_tile<Policy>(p, r0, c0, shared);
    if (live) {
      const int cols = static_cast<int>(p.m - c0 < kTile ? p.m - c0 : kTile);
      // columns ascend, so a strict comparison keeps the lowest index among equals
    #pragma unroll 1
      for (int j = epilogue_column(); j < cols; j += 2) {
        bool positive, negative;
        pair_kind(label, shared.col_labels[j], row, c0 + j, p.self_offset, positive, negative);
        const Acc squared = row_sq + y_sq[c0 + j] - 2 * shared.s[local * Layout::kAccLd + j];
        if (positive && (far_at < 0 || squared > far)) far = squared, far_at = c0 + j;
        if (negative && (near_at < 0 || squared < near)) near = squared, near_at = c0 + j;
      }
    }
    __syncthreads();
  }
  const Acc partner_far = from_partner(far), partner_near = from_partner(near);
  const int64_t partner_far_at = from_partner(far_at), partner_near_at = from_partner(near_at);
  keep_better<true>(far, far_at, partner_far, partner_far_at);
  keep_better<false>(near, near_at, partner_near, partner_near_at);
  if (live && epilogue_column() == 0) {
    choices[row] = far_at;
    choices[p.n + row] = near_at;
  }
}

template <class Policy>
cudaError_t select(const CudaPairRowsParams& p, const void* x_sq, const void* y_sq, int64_t* choices,
                   cudaStream_t stream) {
  using Acc = typename Policy::Acc;
  const int64_t bytes = SharedLayout<Policy>::kForwardBytes;
  auto kernel = batch_hard_select_kernel<Policy>;
  if (cudaError_t error =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)))
    return error;
  kernel<<<dim3((p.n + kTile - 1) / kTile), kThreads, bytes, stream>>>(p, static_cast<const Acc*>(x_sq),
                                                                       static_cast<const Acc*>(y_sq), choices);
  return cudaGetLastError();
}

}  // namespace

int batch_hard_select(const CudaPairRowsParams& p, const void* x_sq, const void* y_sq, int64_t* choices,
                      void* stream) {
  if (p.n == 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  switch (p.operand) {
    case Operand::kFloat32: return select<SimtTile<float>>(p, x_sq, y_sq, choices, s);
    case Operand::kTf32: return select<WmmaTile<Tf32>>(p, x_sq, y_sq, choices, s);
    case Operand::kFloat16: return select<WmmaTile<__half>>(p, x_sq, y_sq, choices, s);
    case Operand::kBFloat16: return select<WmmaTile<__nv_bfloat16>>(p, x_sq, y_sq, choices, s);
    case Operand::kFloat64: return select<SimtTile<double>>(p, x_sq, y_sq, choices, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace metric_kernels::cuda
