// CUDA selection of batch-hard triplets on the engine of engine.cuh: per query, the farthest positive and the
// nearest negative by squared distance |u|^2 + |v|^2 - 2 s of the (when asked, normalised) rows, ties to the lowest
// index (as the CPU kernel and the reference), and with tf32 products each side's runner-up. Only the indices leave
// the kernel; the loss and its O(N D) backward are computed on the chosen pairs (csrc/cuda/triplet.cu).
#ifdef METRIC_KERNELS_HOST_EMULATION
#include "host_emulation.h"
#else
#include <cuda_runtime.h>
#endif

#include <limits>
#include <type_traits>

#include "engine.cuh"
#include "launch.h"

namespace metric_kernels::cuda {
namespace {

// The best (value, index) of a thread's columns, and with kRunnersUp the second best: better is larger (kLarger) or
// smaller, equal values go to the lower index; index -1 is "none yet". A NaN is never taken, nor a value equal to
// the starting -inf (farthest) / +inf (nearest).
template <bool kLarger, bool kRunnersUp, class T>
struct Hardest {
  T value[2] = {kLarger ? -std::numeric_limits<T>::infinity() : std::numeric_limits<T>::infinity(),
                kLarger ? -std::numeric_limits<T>::infinity() : std::numeric_limits<T>::infinity()};
  int64_t index[2] = {-1, -1};

  __device__ __forceinline__ bool beats(T other, int64_t other_index, int place) const {
    const bool better = kLarger ? other > value[place] : other < value[place];
    return better || (other == value[place] && index[place] >= 0 && other_index < index[place]);
  }

  __device__ __forceinline__ void take(T other, int64_t other_index) {
    if (other_index < 0) return;
    if (beats(other, other_index, 0)) {
      if constexpr (kRunnersUp) value[1] = value[0], index[1] = index[0];
      value[0] = other, index[0] = other_index;
    } else if (kRunnersUp && beats(other, other_index, 1)) {
      value[1] = other, index[1] = other_index;
    }
  }

  // The partner thread's columns are the row's others: its best (two) folded into this thread's. Every thread of
  // the warp calls it (shuffles), and exchanges all it needs before taking any.
  __device__ __forceinline__ void take_partners() {
    const T first = from_partner(value[0]);
    const int64_t first_index = from_partner(index[0]);
    if constexpr (kRunnersUp) {
      const T second = from_partner(value[1]);
      const int64_t second_index = from_partner(index[1]);
      take(first, first_index);
      take(second, second_index);
    } else {
      take(first, first_index);
    }
  }
};

// With tf32 products two candidates closer than tf32's error can swap, so the selection also hands out each side's
// runner-up, and the caller chooses between the two on exact distances (metric_kernels/_row_epilogues.py).
template <class Policy>
constexpr bool kRunnersUp = std::is_same_v<Policy, WmmaTile<Tf32>>;

template <class Policy>
__global__ void __launch_bounds__(kThreads, 2) batch_hard_select_kernel(const CudaPairRowsParams p,
                                                                       int64_t* choices, bool resident) {
  using Acc = typename Policy::Acc;
  SharedLayout<Policy> shared = block_shared<Policy>(resident);
  const QueryRow<Acc> query = query_row<Acc>(p);
  Hardest<true, kRunnersUp<Policy>, Acc> far;
  Hardest<false, kRunnersUp<Policy>, Acc> near;
  // The columns come in no particular order, so equal distances keep the lowest index; as in the CPU kernel, a NaN
  // distance is never chosen, nor a farthest positive at -inf or a nearest negative at +inf.
  for_each_row_pair<Policy>(p, query, shared, resident, [&](Acc s, Acc column_length2, int64_t column, bool positive,
                                                            bool negative) {
    const Acc squared = query.scale.length2 + column_length2 - 2 * s;
    if (positive) far.take(squared, column);
    if (negative) near.take(squared, column);
  });
  far.take_partners();
  near.take_partners();
  if (query.live && epilogue_column() == 0) {
    choices[query.row] = far.index[0];
    choices[p.n + query.row] = near.index[0];
    if constexpr (kRunnersUp<Policy>) {
      choices[2 * p.n + query.row] = far.index[1];
      choices[3 * p.n + query.row] = near.index[1];
    }
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

int64_t batch_hard_choice_rows(Operand operand) { return operand == Operand::kTf32 ? 4 : 2; }

int batch_hard_select(const CudaPairRowsParams& p, int64_t* choices, void* stream) {
  if (p.n == 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  return with_policy(p.operand, cudaErrorInvalidValue,
                     [&](auto policy) { return select<decltype(policy)>(p, choices, s); });
}

}  // namespace metric_kernels::cuda
