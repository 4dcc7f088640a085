// CUDA selection of batch-hard triplets on the engine of engine.cuh: per query, the farthest positive and the
// nearest negative by squared distance |u|^2 + |v|^2 - 2 s of the (when asked, normalised) rows, ties to the lowest index (as the CPU kernel and the
// reference). Only the indices leave the kernel; the loss and its O(N D) backward are computed on the chosen pairs.
#ifdef METRIC_KERNELS_HOST_EMULATION
#include "host_emulation.h"
#else
#include <cuda_runtime.h>
#endif

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
                                                                       int64_t* choices, bool resident) {
  using Acc = typename Policy::Acc;
  SharedLayout<Policy> shared = block_shared<Policy>(resident);
  const QueryRow<Acc> query = query_row<Acc>(p);
  Acc far = -std::numeric_limits<Acc>::infinity(), near = std::numeric_limits<Acc>::infinity();
  int64_t far_at = -1, near_at = -1;
  // The columns come in no particular order, so equal distances keep the lowest index; as in the CPU kernel, a NaN
  // distance is never chosen, nor a farthest positive at -inf or a nearest negative at +inf.
  for_each_row_pair<Policy>(p, query, shared, resident, [&](Acc s, Acc column_length2, int64_t column, bool positive,
                                                            bool negative) {
    const Acc squared = query.scale.length2 + column_length2 - 2 * s;
    if (positive && (squared > far || (squared == far && far_at >= 0 && column < far_at))) far = squared, far_at = column;
    if (negative && (squared < near || (squared == near && near_at >= 0 && column < near_at)))
      near = squared, near_at = column;
  });
  const Acc partner_far = from_partner(far), partner_near = from_partner(near);
  const int64_t partner_far_at = from_partner(far_at), partner_near_at = from_partner(near_at);
  keep_better<true>(far, far_at, partner_far, partner_far_at);
  keep_better<false>(near, near_at, partner_near, partner_near_at);
  if (query.live && epilogue_column() == 0) {
    choices[query.row] = far_at;
    choices[p.n + query.row] = near_at;
  }
}

template <class Policy>
cudaError_t select(const CudaPairRowsParams& p, int64_t* choices, cudaStream_t stream) {
  const int64_t bytes = SharedLayout<Policy>::kForwardBytes;
  const bool resident = keeps_resident<Policy>(p.d, bytes);
  return launch(batch_hard_select_kernel<Policy>, dim3(static_cast<unsigned>(blocks(p.n))),
                resident_bytes<Policy>(bytes, resident), stream, p, choices, resident);
}

}  // namespace

int batch_hard_select(const CudaPairRowsParams& p, int64_t* choices, void* stream) {
  if (p.n == 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  return with_policy(p.operand, cudaErrorInvalidValue,
                     [&](auto policy) { return select<decltype(policy)>(p, choices, s); });
}

}  // namespace metric_kernels::cuda
