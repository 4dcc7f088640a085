// Checks of the CUDA host emulation (csrc/cuda/host_emulation.h) on its own, driven by tests/test_cuda_emulated.py:
//   check convert IN OUT   fp32 -> fp16 / bf16 / tf32 of the floats in IN, and fp16 / bf16 -> fp32 of every 16-bit
//                          pattern, written to OUT for comparison with torch
//   check semantics        kernels whose results are known: indices, shared memory, barriers, shuffles, atomics,
//                          WMMA against plain loops, launch errors; prints "ok"
//   check kernels          the kernels of csrc/cuda on every operand type (forward, both backward paths, the
//                          triplet margin loss's and the classifiers'), built with -fsanitize=thread by the test: a
//                          data race between the threads of a block is reported
//   check <failure>        a kernel the emulation must stop, with its message (FAILURES in the test)
#include "cuda/host_emulation.h"
#define cuda cuda_emulated  // as CMakeLists.txt builds them
#include "cuda/batch_hard.cu"
#include "cuda/lse_rows.cu"
#include "cuda/margin_softmax.cu"
#undef cuda

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

namespace metric_kernels::cuda_emulated {  // the namespace of the dynamic shared memory (host_emulation.cpp)

int failures = 0;
#define CHECK(condition)                                                    \
  do {                                                                      \
    if (!(condition)) {                                                     \
      std::printf("check failed, line %d: %s\n", __LINE__, #condition);    \
      ++failures;                                                           \
    }                                                                       \
  } while (0)

template <class... Params, class... Args>
cudaError_t run(void (*kernel)(Params...), dim3 grid, dim3 block, size_t bytes, Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = bytes;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

// ---- semantics ----------------------------------------------------------------------------------------------------

__global__ void indices_kernel(int* out) {  // out[global thread] = its coordinates, packed
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned per_block = blockDim.x * blockDim.y * blockDim.z;
  out[block * per_block + thread] = static_cast<int>(block * 1000 + thread);
}

__global__ void shared_kernel(float* out, int* unwritten) {
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  auto* values = reinterpret_cast<float*>(shared_bytes);
  // Every block starts from unwritten (0xFF) shared memory, whatever the previous block left.
  if (threadIdx.x == 0) unwritten[blockIdx.x] = std::isnan(values[127 - threadIdx.x]) ? 1 : 0;
  __syncthreads();
  values[threadIdx.x] = static_cast<float>(threadIdx.x + blockIdx.x);
  __syncthreads();
  float sum = 0;  // every thread reads what the others wrote before the barrier
  for (int i = 0; i < 128; ++i) sum += values[i];
  out[blockIdx.x * 128 + threadIdx.x] = sum;
}

__global__ void shuffle_kernel(long long* out) {
  for (int mask = 0; mask < 32; ++mask) {
    const long long mine = 1000LL * threadIdx.x + mask;
    out[(mask * 64) + threadIdx.x] = __shfl_xor_sync(0xffffffffu, mine, mask);
  }
  const double value = __shfl_xor_sync(0xffffffffu, 0.5 + threadIdx.x, 1);
  out[32 * 64 + threadIdx.x] = static_cast<long long>(value * 2);
}

__global__ void atomic_kernel(float* total, double* total64) {
  for (int i = 0; i < 100; ++i) {
    atomicAdd(total, 1.0f);
    atomicAdd(total64, 0.25);
  }
}

template <class T, int K>
__global__ void wmma_kernel(const typename nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, K, T,
                                                                  nvcuda::wmma::row_major>::element_type* a,
                            const typename nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, K, T,
                                                                  nvcuda::wmma::col_major>::element_type* b,
                            float* c) {
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::matrix_a, 16, 16, K, T, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, K, T, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, K, float> acc;
  wmma::fill_fragment(acc, 1.0f);
  wmma::load_matrix_sync(fa, a, K);  // A: 16 x K row-major
  wmma::load_matrix_sync(fb, b, K);  // B: K x 16 column-major (B^T row-major)
  if constexpr (std::is_same_v<T, wmma::precision::tf32>) {
    for (int e = 0; e < fa.num_elements; ++e) fa.x[e] = wmma::__float_to_tf32(fa.x[e]);
    for (int e = 0; e < fb.num_elements; ++e) fb.x[e] = wmma::__float_to_tf32(fb.x[e]);
  }
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
}

float tf32_round(float value) { return nvcuda::wmma::__float_to_tf32(value); }

template <class T, int K, class Storage>
void check_wmma(std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  alignas(32) Storage a[16 * K], b[16 * K];
  alignas(32) float c[256];
  float af[16 * K], bf[16 * K];
  for (int e = 0; e < 16 * K; ++e) {
    a[e] = Storage(normal(rng));
    b[e] = Storage(normal(rng));
    af[e] = std::is_same_v<Storage, float> ? tf32_round(static_cast<float>(a[e])) : static_cast<float>(a[e]);
    bf[e] = std::is_same_v<Storage, float> ? tf32_round(static_cast<float>(b[e])) : static_cast<float>(b[e]);
  }
  CHECK(run(wmma_kernel<T, K>, dim3(1), dim3(32), 0, a, b, c) == cudaSuccess);
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      double exact = 1.0;
      for (int k = 0; k < K; ++k) exact += static_cast<double>(af[i * K + k]) * bf[j * K + k];
      CHECK(std::fabs(c[i * 16 + j] - exact) <= 1e-5 * (1.0 + std::fabs(exact)));
    }
}

// Each thread copies 16 bytes (4 floats) of `in` to shared memory asynchronously, the last 8 of them zero-filled
// for odd threads; out gets what shared memory held before the wait (poison), after waiting for all but the newest
// group (the first copy landed, the second not), and after waiting for all.
__global__ void async_copy_kernel(const float* in, float* before, float* between, float* after) {
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  auto* values = reinterpret_cast<float*>(shared_bytes);
  const int t = threadIdx.x;
  __pipeline_memcpy_async(values + 8 * t, in + 4 * t, 16, t % 2 ? 8 : 0);
  __pipeline_commit();
  __pipeline_memcpy_async(values + 8 * t + 4, in + 4 * t, 16);
  __pipeline_commit();
  before[t] = values[8 * t];
  __pipeline_wait_prior(1);
  for (int i = 0; i < 8; ++i) between[8 * t + i] = values[8 * t + i];
  __pipeline_wait_prior(0);
  for (int i = 0; i < 8; ++i) after[8 * t + i] = values[8 * t + i];
}

__global__ void empty_kernel() {}

int semantics() {
  {  // every thread of every block runs once, with its own coordinates
    const dim3 grid(3, 2, 2), block(8, 4, 2);
    std::vector<int> out(12 * 64, -1);
    CHECK(run(indices_kernel, grid, block, 0, out.data()) == cudaSuccess);
    for (int b = 0; b < 12; ++b)
      for (int t = 0; t < 64; ++t) CHECK(out[b * 64 + t] == b * 1000 + t);
  }
  {
    std::vector<float> out(4 * 128);
    std::vector<int> unwritten(4, 0);
    CHECK(run(shared_kernel, dim3(4), dim3(128), 512, out.data(), unwritten.data()) == cudaSuccess);
    for (int b = 0; b < 4; ++b) {
      CHECK(unwritten[b] == 1);
      for (int t = 0; t < 128; ++t) CHECK(out[b * 128 + t] == 127.0f * 128 / 2 + 128.0f * b);
    }
  }
  {
    std::vector<long long> out(33 * 64);
    CHECK(run(shuffle_kernel, dim3(1), dim3(64), 0, out.data()) == cudaSuccess);
    for (int mask = 0; mask < 32; ++mask)
      for (int t = 0; t < 64; ++t) {
        const int partner = (t & ~31) | ((t & 31) ^ mask);
        CHECK(out[mask * 64 + t] == 1000LL * partner + mask);
      }
    for (int t = 0; t < 64; ++t) CHECK(out[32 * 64 + t] == 2 * (t ^ 1) + 1);
  }
  {
    float total = 0;
    double total64 = 0;
    CHECK(run(atomic_kernel, dim3(3), dim3(128), 0, &total, &total64) == cudaSuccess);
    CHECK(total == 3 * 128 * 100.0f && total64 == 3 * 128 * 25.0);
  }
  {
    std::mt19937 rng(3);
    check_wmma<__half, 16, __half>(rng);
    check_wmma<__nv_bfloat16, 16, __nv_bfloat16>(rng);
    check_wmma<nvcuda::wmma::precision::tf32, 8, float>(rng);
  }
  {  // asynchronous copies land when waited for, zero-filled where asked
    std::vector<float> in(4 * 32), before(32), between(8 * 32), after(8 * 32);
    for (int i = 0; i < 4 * 32; ++i) in[i] = static_cast<float>(i + 1);
    CHECK(run(async_copy_kernel, dim3(1), dim3(32), 8 * 32 * 4, in.data(), before.data(), between.data(),
              after.data()) == cudaSuccess);
    for (int t = 0; t < 32; ++t) {
      CHECK(std::isnan(before[t]));
      for (int i = 0; i < 4; ++i) {
        const float first = t % 2 && i >= 2 ? 0.0f : in[4 * t + i];
        CHECK(between[8 * t + i] == first && std::isnan(between[8 * t + 4 + i]));
        CHECK(after[8 * t + i] == first && after[8 * t + 4 + i] == in[4 * t + i]);
      }
    }
  }
  {  // launches a GPU refuses are refused, with CUDA's error codes
    CHECK(run(empty_kernel, dim3(1), dim3(1025), 0) == cudaErrorInvalidConfiguration);
    CHECK(run(empty_kernel, dim3(1, 65536), dim3(32), 0) == cudaErrorInvalidConfiguration);
    CHECK(run(empty_kernel, dim3(0), dim3(32), 0) == cudaErrorInvalidConfiguration);
    CHECK(run(empty_kernel, dim3(1), dim3(32), 48 * 1024 + 16) == cudaErrorInvalidValue);  // no opt-in
    CHECK(cudaFuncSetAttribute(empty_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024) == cudaSuccess);
    CHECK(run(empty_kernel, dim3(1), dim3(32), 100 * 1024) == cudaSuccess);
    CHECK(run(empty_kernel, dim3(1), dim3(32), 100 * 1024 + 16) == cudaErrorInvalidValue);
    CHECK(cudaFuncSetAttribute(empty_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 228 * 1024) ==
          cudaErrorInvalidValue);
    int optin = 0;
    CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0) == cudaSuccess);
    CHECK(optin == 227 * 1024);
  }
  std::printf(failures ? "failed\n" : "ok\n");
  return failures != 0;
}

// ---- what the emulation must stop -----------------------------------------------------------------------------------

__global__ void divergent_sync_kernel() {
  if (threadIdx.x == 5) return;
  __syncthreads();
}

__global__ void shuffle_exited_kernel(int* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

__global__ void shuffle_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 1);
}

__global__ void wmma_misaligned_kernel(const __half* a) {
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> fa;
  nvcuda::wmma::load_matrix_sync(fa, a + 1, 16);
}

__global__ void wmma_leading_dimension_kernel(const __half* a) {
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> fa;
  nvcuda::wmma::load_matrix_sync(fa, a, 20);  // 40 bytes: not a multiple of 16
}

__global__ void shared_overflow_kernel() {
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  if (threadIdx.x == 0) shared_bytes[1000] = 1;  // 1000 bytes launched
}

__global__ void shared_unmapped_kernel() {
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  if (threadIdx.x == 0) shared_bytes[8192] = 1;  // pages past the launch's size are inaccessible
}

__global__ void async_unwaited_kernel(const float* in) {
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  __pipeline_memcpy_async(shared_bytes + 16 * threadIdx.x, in + 4 * threadIdx.x, 16);
  __pipeline_commit();
}

__global__ void async_misaligned_kernel(const float* in) {
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  __pipeline_memcpy_async(shared_bytes + 16 * threadIdx.x, in + 4 * threadIdx.x + 1, 16);
  __pipeline_wait_prior(0);
}

int failure(const std::string& which) {
  alignas(32) static __half a[16 * 32];
  static int out[128];
  if (which == "divergent_sync") return run(divergent_sync_kernel, dim3(1), dim3(64), 0);
  if (which == "shuffle_exited") return run(shuffle_exited_kernel, dim3(1), dim3(32), 0, out);
  if (which == "shuffle_mask") return run(shuffle_mask_kernel, dim3(1), dim3(32), 0, out);
  if (which == "wmma_misaligned") return run(wmma_misaligned_kernel, dim3(1), dim3(32), 0, +a);
  if (which == "wmma_leading_dimension") return run(wmma_leading_dimension_kernel, dim3(1), dim3(32), 0, +a);
  if (which == "shared_overflow") return run(shared_overflow_kernel, dim3(1), dim3(32), 1000);
  if (which == "shared_unmapped") return run(shared_unmapped_kernel, dim3(1), dim3(32), 1000);
  alignas(16) static float floats[4 * 32 + 4];
  if (which == "async_unwaited") return run(async_unwaited_kernel, dim3(1), dim3(32), 512, +floats);
  if (which == "async_misaligned") return run(async_misaligned_kernel, dim3(1), dim3(32), 512, +floats);
  if (which == "outside_kernel") {
    __syncthreads();
    return 0;
  }
  std::printf("unknown check %s\n", which.c_str());
  return 2;
}

// ---- the kernels ---------------------------------------------------------------------------------------------------

template <class T, class Acc>
int kernels(Operand operand, std::mt19937& rng) {
  // D = 136: three 64-wide slices in a backward block (the last ragged), two blocks along D in the atomic backward
  const int n = 70, m = 90, d = 136;
  std::normal_distribution<float> normal(0.0f, 0.2f);
  std::vector<T> x(n * d), y(m * d);
  for (auto& e : x) e = T(normal(rng));
  for (auto& e : y) e = T(normal(rng));
  std::vector<int64_t> x_labels(n), y_labels(m);
  for (auto& l : x_labels) l = rng() % 4;
  for (auto& l : y_labels) l = rng() % 4;
  std::vector<Acc> x_sq(n), y_sq(m);  // squared row norms, for the distances
  for (int i = 0; i < n; ++i)
    for (int e = 0; e < d; ++e) x_sq[i] += static_cast<Acc>(x[i * d + e]) * static_cast<Acc>(x[i * d + e]);
  for (int j = 0; j < m; ++j)
    for (int e = 0; e < d; ++e) y_sq[j] += static_cast<Acc>(y[j * d + e]) * static_cast<Acc>(y[j * d + e]);
  int errors = 0;
  // Circle with references y, SupCon on the queries (one gradient buffer); the dot product, then the Euclidean
  // distance (the norm terms' sums in shared memory)
  for (int pair = 0; pair <= 2; pair += 2) {
    for (int kind = 0; kind < 2; ++kind) {
      const bool same = kind == 1;
      CudaPairRowsParams p{x.data(), same ? x.data() : y.data(), x_labels.data(),
                           same ? x_labels.data() : y_labels.data(), n, same ? n : m, d, d, d, same ? 0 : -1,
                           kind, 0.25, 8.0, operand};
      p.pair_value = pair, p.x_sq = x_sq.data(), p.y_sq = same ? x_sq.data() : y_sq.data();
      p.normalize = pair == 0;  // the normalisation's row and column terms in shared memory too
      std::vector<Acc> stats(4 * n), grad(4 * n, Acc(0.5)), dx(n * d, 0), dy(m * d, 0), gradient_scale(1);
      errors += lse_rows_forward(p, stats.data(), nullptr) != 0;
      for (int atomic = 0; atomic < (supports_atomic_backward(operand) ? 2 : 1); ++atomic) {
        std::fill(dx.begin(), dx.end(), Acc(0));
        std::fill(dy.begin(), dy.end(), Acc(0));
        const CudaPairRowsBackwardParams bp{p,    grad.data(), stats.data(), dx.data(), same ? dx.data() : dy.data(),
                                            same, atomic == 1,
                                            operand == Operand::kFloat16 ? gradient_scale.data() : nullptr};
        errors += lse_rows_backward(bp, nullptr) != 0;
      }
    }
  }
  // The triplet margin loss against y, smooth, on the Euclidean distance of the rows normalised inside: its forward's
  // second sweep reads the partner thread's pair values from S, and its dS (the table and weights) feeds both
  // backward paths.
  std::vector<int64_t> rank(m), class_sizes(4, 0);
  for (int j = 0; j < m; ++j) rank[j] = class_sizes[y_labels[j]]++;
  const CudaTripletSlots slots{rank.data(), *std::max_element(class_sizes.begin(), class_sizes.end()), true};
  CudaPairRowsParams tp{x.data(), y.data(), x_labels.data(), y_labels.data(), n, m, d, d, d, -1, kTripletMargin, 0.2,
                        0, operand};
  tp.pair_value = 2, tp.x_sq = x_sq.data(), tp.y_sq = y_sq.data(), tp.normalize = true;
  std::vector<Acc> triplet_stats(2 * n), table(n * slots.slot_count), weights(n * slots.slot_count);
  std::vector<Acc> triplet_grad(n, Acc(0.5)), triplet_dx(n * d), triplet_dy(m * d), triplet_scale(1);
  errors += triplet_margin_forward(tp, slots, triplet_stats.data(), table.data(), weights.data(), nullptr) != 0;
  for (int atomic = 0; atomic < (supports_atomic_backward(operand) ? 2 : 1); ++atomic) {
    std::fill(triplet_dy.begin(), triplet_dy.end(), Acc(0));  // the atomic pass adds into zeros
    CudaPairRowsBackwardParams bp{tp,    triplet_grad.data(), nullptr, triplet_dx.data(), triplet_dy.data(), false,
                                  atomic == 1, operand == Operand::kFloat16 ? triplet_scale.data() : nullptr};
    bp.triplet = slots, bp.table = table.data(), bp.weights = weights.data();
    errors += lse_rows_backward(bp, nullptr) != 0;
  }
  std::vector<int64_t> choices(batch_hard_choice_rows(operand) * n);
  CudaPairRowsParams p{x.data(), y.data(), x_labels.data(), y_labels.data(), n, m, d, d, d, 3, 0, 0, 0, operand};
  p.x_sq = x_sq.data(), p.y_sq = y_sq.data();
  errors += batch_hard_select(p, choices.data(), nullptr) != 0;
  // The classifiers: y's rows as the columns of W (D x J, J = m), 30 classes of 3 sub-centres, pooled by the largest
  // on cosines and by SoftTriple's softmax on raw products
  std::vector<T> w(d * m);
  for (int j = 0; j < m; ++j)
    for (int e = 0; e < d; ++e) w[e * m + j] = y[j * d + e];
  std::vector<int64_t> classes(n);
  for (auto& l : classes) l = rng() % 30;
  std::vector<Acc> inverse(n + m), class_stats(2 * n), class_grad(2 * n, Acc(0.5)), class_dx(n * d), dw(d * m);
  for (const bool soft : {false, true}) {
    const CudaMarginSoftmaxParams c{x.data(), w.data(), classes.data(), inverse.data(), inverse.data() + n, n, d, 30, 3,
                                    d, m, 8.0, !soft, !soft, soft ? 4.0 : 0.0, operand};
    errors += margin_softmax_forward(c, class_stats.data(), nullptr) != 0;
    for (const bool atomic : {false, true}) {
      if (atomic && !supports_atomic_backward(operand)) continue;
      std::fill(dw.begin(), dw.end(), Acc(0));  // the atomic pass adds into zeros
      const CudaMarginSoftmaxBackwardParams cb{c, class_grad.data(), class_stats.data(), class_dx.data(), dw.data(),
                                               atomic};
      errors += margin_softmax_backward(cb, nullptr) != 0;
    }
  }
  return errors;
}

int all_kernels() {
  std::mt19937 rng(1);
  int errors = kernels<double, double>(Operand::kFloat64, rng) + kernels<float, float>(Operand::kFloat32, rng) +
               kernels<float, float>(Operand::kTf32, rng) + kernels<__half, float>(Operand::kFloat16, rng) +
               kernels<__nv_bfloat16, float>(Operand::kBFloat16, rng);
  std::printf(errors ? "launch errors: %d\n" : "ok\n", errors);
  return errors != 0;
}

// ---- conversions --------------------------------------------------------------------------------------------------

int convert(const char* in_path, const char* out_path) {
  std::FILE* in = std::fopen(in_path, "rb");
  if (!in) return 2;
  std::vector<float> values;
  float value;
  while (std::fread(&value, 4, 1, in) == 1) values.push_back(value);
  std::fclose(in);
  std::FILE* out = std::fopen(out_path, "wb");
  for (float v : values) {  // per input: fp16 bits, bf16 bits, tf32 as float
    const __half h(v);
    const __nv_bfloat16 b(v);
    const float t = nvcuda::wmma::__float_to_tf32(v);
    std::fwrite(&h.__x, 2, 1, out);
    std::fwrite(&b.__x, 2, 1, out);
    std::fwrite(&t, 4, 1, out);
  }
  for (unsigned bits = 0; bits < 65536; ++bits) {  // then fp16 -> fp32 and bf16 -> fp32 of every pattern
    __half h;
    __nv_bfloat16 b;
    h.__x = b.__x = static_cast<std::uint16_t>(bits);
    const float hf = static_cast<float>(h), bf = static_cast<float>(b);
    std::fwrite(&hf, 4, 1, out);
    std::fwrite(&bf, 4, 1, out);
  }
  std::fclose(out);
  return 0;
}

}  // namespace metric_kernels::cuda_emulated

int main(int argc, char** argv) {
  using namespace metric_kernels::cuda_emulated;
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "convert" && argc == 4) return convert(argv[2], argv[3]);
  if (mode == "semantics") return semantics();
  if (mode == "kernels") return all_kernels();
  const int code = failure(mode);
  std::printf("not stopped (code %d)\n", code);
  return 3;
}
