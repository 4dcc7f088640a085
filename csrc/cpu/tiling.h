// What the CPU kernels' tile loops share.
#pragma once

#include <cstdint>

namespace metric_kernels::cpu {

// How many blocks of `block` cover `size`.
inline int64_t blocks(int64_t size, int64_t block) { return (size + block - 1) / block; }

// The sum of values[0 : count] in 8 interleaved partial sums (which the compiler keeps in vector registers, where
// one running sum would be a serial chain), then the partial sums and the tail in order.
template <typename T>
inline __attribute__((always_inline)) T lane_sum(const T* values, int64_t count) {
  constexpr int64_t kLanes = 8;
  T partial[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= count; j += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) partial[k] += values[j + k];
  T sum = 0;
  for (int64_t k = 0; k < kLanes; ++k) sum += partial[k];
  for (; j < count; ++j) sum += values[j];
  return sum;
}

}  // namespace metric_kernels::cpu
