// Host emulation of the CUDA the kernels in this directory use, so that their code computes on the CPU (the
// cuda_emulated_* ops, backend "cuda-emulated") and is checked against the float64 reference in CI, where no GPU is.
// Kernel sources include it instead of CUDA's headers when METRIC_KERNELS_HOST_EMULATION is defined; CMakeLists.txt
// compiles every csrc/cuda/*.cu that way with the host compiler.
//
// Execution model: a launch runs its blocks one after another; a block's threads run concurrently, one host thread
// per CUDA thread (a persistent pool, reused across blocks and launches). __syncthreads is a barrier of the block's
// threads, __shfl_xor_sync a rendezvous of the warp's 32 threads; launches are serialised and complete before they
// return (stream order holds trivially). Shared memory is one buffer, filled with 0xFF bytes (NaN, -1) before every
// block so that reads of unwritten shared memory show; the pages past a launch's dynamic size are inaccessible while
// it runs, and the rest of the last page is checked for stray writes afterwards.
//
// What is emulated, and nothing else (anything outside it fails to compile, or stops the process with a message):
//   threadIdx, blockIdx, blockDim, gridDim; __global__, __device__, __host__, __forceinline__, __launch_bounds__,
//   __align__; dynamic shared memory (`extern __shared__ T name[]`; any other __shared__ declaration is an error);
//   __syncthreads (a thread that returned while others wait in it stops the process); __shfl_xor_sync with a full
//   mask on 4- and 8-byte arithmetic types; atomicAdd on float and double; fma; __half and __nv_bfloat16 storage with
//   exact round-to-nearest-even conversions from float (no arithmetic on them); WMMA fragments m16n16k16 (__half,
//   __nv_bfloat16) and m16n16k8 (precision::tf32) with float accumulators: fill_fragment, load_matrix_sync (A, B and
//   row- or column-major accumulators), mma_sync, store_matrix_sync, __float_to_tf32 (round to nearest, ties away,
//   as cvt.rna.tf32.f32); asynchronous
//   copies to shared memory (cuda_pipeline_primitives.h's __pipeline_memcpy_async of 4, 8 or 16 aligned bytes with
//   zero fill, __pipeline_commit, __pipeline_wait_prior: a group's bytes land when a wait lets it, not at issue, so a
//   read before its wait sees the poisoned memory; a thread that ends with copies not waited for stops the process);
//   the runtime
//   calls cudaLaunchKernelEx, cudaFuncSetAttribute (cudaFuncAttributeMaxDynamicSharedMemorySize),
//   cudaGetDevice (device 0), cudaDeviceGetAttribute (cudaDevAttrMaxSharedMemoryPerBlockOptin: an sm_90 GPU's 227 KB unless
//   METRIC_KERNELS_EMULATED_SHARED_BYTES says otherwise), cudaGetErrorString. Launches are checked as a GPU checks them
//   (block size, grid limits, dynamic shared memory against the kernel's opt-in) and fail with CUDA's error codes.
//
// Numerics: fp32 and fp64 products are IEEE fmas in the kernels' order, as on the GPU. WMMA products are exact (16-bit
// and tf32 operands multiply exactly in fp32) and are summed in fp32 in ascending k; a tensor core sums in its own
// order and internal width, and mma_sync reads only the tf32 bits of fp32 operands (emulated by truncation). exp and
// log are the host's, and the host compiler contracts a * b + c into fmas where nvcc's rules differ (x86-64's
// baseline has no fma, so not at all): results agree with a GPU's to rounding, not bitwise. What needs a GPU: speed, real concurrency between blocks (blocks never overlap
// here, so races between blocks and the atomics' ordering cannot show), and the tensor cores' own rounding.
#pragma once

#if defined(__CUDACC__)
#error "host_emulation.h is for the host compiler; nvcc compiles the kernels for a GPU"
#endif

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- qualifiers ----------------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// `extern __shared__ T name[]` (dynamic shared memory) declares the emulation's buffer (host_emulation.cpp defines
// it). Any other __shared__ variable is rejected: GCC refuses a weak declaration of a local variable ("weak
// declaration of 'x' must be public"), so static shared memory inside a kernel does not compile.
#define __shared__ __attribute__((weak))

// ---- built-in types and variables -----------------------------------------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

namespace metric_kernels::host_emulation {

constexpr int kWarpSize = 32;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr int kDefaultDynamicSharedBytes = 48 * 1024;   // without cudaFuncSetAttribute
constexpr int kMaxDynamicSharedBytes = 227 * 1024;      // cudaDevAttrMaxSharedMemoryPerBlockOptin of sm_90

// The emulated GPU's opt-in limit of dynamic shared memory per block: sm_90's 227 KB, or the bytes in the environment
// variable METRIC_KERNELS_EMULATED_SHARED_BYTES (48 KB to 227 KB; 101376 is an sm_86/sm_89/sm_120 GPU's 99 KB).
int shared_bytes_optin();

struct Block;

// What one emulated CUDA thread knows about itself (set by the pool before it runs a block).
struct ThreadState {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
  int linear;  // thread index within the block
  int lane;    // linear % 32
  int warp;    // linear / 32
  int exchange_parity;  // which of the warp's two exchange buffers the next shuffle uses
  Block* block;
};

// The calling CUDA thread (set by the pool; block is null outside a kernel).
inline thread_local ThreadState thread_state{};

// Prints "metric_kernels host emulation: <what>" and aborts: a kernel did something the emulation does not model
// (or that is undefined on a GPU).
[[noreturn]] void fail(const char* what);

// The calling CUDA thread; fails outside a kernel.
const ThreadState& this_thread();

void sync_threads();
// Waits for the warp's 32 lanes (what a warp-collective instruction implies between the lanes' parts).
void sync_warp();
// Deposits `size` bytes for this lane, waits for the warp, and returns where lane ^ lane_mask deposited its bytes.
const void* warp_exchange(const void* value, std::size_t size, int lane_mask);

// A launch: `body` runs once per thread of every block.
struct LaunchShape {
  dim3 grid, block;
  std::size_t dynamic_shared_bytes;
  const void* kernel;  // the key of cudaFuncSetAttribute
};
int launch(const LaunchShape& shape, void (*body)(const void*), const void* context);  // a cudaError_t

int set_max_dynamic_shared_bytes(const void* kernel, int bytes);

// fp16 / bf16 <-> fp32, round to nearest even (NaN -> 0x7fff as CUDA's __float2half / __float2bfloat16).
std::uint16_t float_to_half_bits(float value);
float half_bits_to_float(std::uint16_t bits);
inline std::uint16_t float_to_bfloat16_bits(float value) {
  std::uint32_t u;
  std::memcpy(&u, &value, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}
inline float bfloat16_bits_to_float(std::uint16_t bits) {
  const std::uint32_t u = static_cast<std::uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &u, 4);
  return value;
}

// A thread's asynchronous copies (__pipeline_memcpy_async): those issued since its last commit, and its committed
// groups, oldest first, which land when __pipeline_wait_prior reaches them.
struct AsyncCopy {
  void* dst;
  const void* src;
  std::size_t bytes, zero_fill;
};
struct AsyncCopies {
  std::vector<AsyncCopy> open;
  std::deque<std::vector<AsyncCopy>> committed;
  bool empty() const { return open.empty() && committed.empty(); }
};
inline thread_local AsyncCopies async_copies;

// What the kernels would make a GPU do, counted as the emulation runs them (the op cuda_emulated_work_counters): the
// products' floating-point operations by operand type (a WMMA mma_sync counts 2 M N K for the warp, a SimtTile step
// its fmas), the atomic additions to global memory, the exponentials of the per-pair math (epilogue.h) and the bytes
// asynchronous copies bring into shared memory (zero fill included; plain loads are not counted).
enum class Work : int {
  kDot16 = 0, kDotTf32 = 1, kDotFp32 = 2, kDotFp64 = 3, kAtomics = 4, kExponentials = 5, kAsyncCopyBytes = 6
};
constexpr int kWorkKinds = 7;
inline std::atomic<std::uint64_t> work_counters[kWorkKinds];
inline void count_work(Work kind, std::uint64_t amount) {
  work_counters[static_cast<int>(kind)].fetch_add(amount, std::memory_order_relaxed);
}

}  // namespace metric_kernels::host_emulation

// Read-only, as on a GPU.
inline thread_local const uint3& threadIdx = metric_kernels::host_emulation::thread_state.thread_idx;
inline thread_local const uint3& blockIdx = metric_kernels::host_emulation::thread_state.block_idx;
inline thread_local const dim3& blockDim = metric_kernels::host_emulation::thread_state.block_dim;
inline thread_local const dim3& gridDim = metric_kernels::host_emulation::thread_state.grid_dim;

inline void __syncthreads() { metric_kernels::host_emulation::sync_threads(); }

template <class T>
inline T __shfl_xor_sync(unsigned int mask, T value, int lane_mask) {
  static_assert(std::is_arithmetic_v<T> && (sizeof(T) == 4 || sizeof(T) == 8),
                "the emulated __shfl_xor_sync takes 4- and 8-byte arithmetic types");
  if (mask != 0xffffffffu) metric_kernels::host_emulation::fail("__shfl_xor_sync: only a full-warp mask is emulated");
  T out;
  std::memcpy(&out, metric_kernels::host_emulation::warp_exchange(&value, sizeof(T), lane_mask), sizeof(T));
  return out;
}

inline float atomicAdd(float* address, float value) {
  metric_kernels::host_emulation::count_work(metric_kernels::host_emulation::Work::kAtomics, 1);
  return std::atomic_ref<float>(*address).fetch_add(value);
}
inline double atomicAdd(double* address, double value) {
  metric_kernels::host_emulation::count_work(metric_kernels::host_emulation::Work::kAtomics, 1);
  return std::atomic_ref<double>(*address).fetch_add(value);
}

// cp.async of `size` bytes (4, 8 or 16; both addresses aligned to it) of which the last `zero_fill` are zeros
// instead of src's (src is not read past size - zero_fill).
inline void __pipeline_memcpy_async(void* dst, const void* src, std::size_t size, std::size_t zero_fill = 0) {
  using metric_kernels::host_emulation::fail;
  metric_kernels::host_emulation::this_thread();
  if (size != 4 && size != 8 && size != 16) fail("__pipeline_memcpy_async: only 4, 8 or 16 bytes are emulated");
  if (zero_fill > size) fail("__pipeline_memcpy_async: more zero fill than bytes");
  if (reinterpret_cast<std::uintptr_t>(dst) % size != 0 ||
      (zero_fill < size && reinterpret_cast<std::uintptr_t>(src) % size != 0))
    fail("__pipeline_memcpy_async: an address not aligned to the copy's size");
  metric_kernels::host_emulation::count_work(metric_kernels::host_emulation::Work::kAsyncCopyBytes, size);
  metric_kernels::host_emulation::async_copies.open.push_back({dst, src, size, zero_fill});
}

inline void __pipeline_commit() {
  auto& copies = metric_kernels::host_emulation::async_copies;
  copies.committed.push_back(std::move(copies.open));
  copies.open.clear();
}

// Waits until at most `prior` of this thread's committed groups are in flight.
inline void __pipeline_wait_prior(std::size_t prior) {
  auto& copies = metric_kernels::host_emulation::async_copies;
  while (copies.committed.size() > prior) {
    for (const auto& copy : copies.committed.front()) {
      const std::size_t read = copy.bytes - copy.zero_fill;
      std::memcpy(copy.dst, copy.src, read);
      std::memset(static_cast<char*>(copy.dst) + read, 0, copy.zero_fill);
    }
    copies.committed.pop_front();
  }
}

// CUDA's fma overloads (the C library declares only the double one globally): one rounding, as on the GPU.
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }

// ---- 16-bit storage types -----------------------------------------------------------------------------------------
// Conversions only: arithmetic on them does not compile (the conversion to float is explicit).
struct __half {
  std::uint16_t __x;
  __half() = default;
  __half(float value) : __x(metric_kernels::host_emulation::float_to_half_bits(value)) {}
  explicit operator float() const { return metric_kernels::host_emulation::half_bits_to_float(__x); }
};

struct __nv_bfloat16 {
  std::uint16_t __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float value) : __x(metric_kernels::host_emulation::float_to_bfloat16_bits(value)) {}
  explicit operator float() const { return metric_kernels::host_emulation::bfloat16_bits_to_float(__x); }
};

// ---- WMMA ---------------------------------------------------------------------------------------------------------
namespace nvcuda::wmma {

struct matrix_a;
struct matrix_b;
struct accumulator;
struct row_major;
struct col_major;
namespace precision {
struct tf32;
}
enum layout_t { mem_row_major, mem_col_major };

// cvt.rna.tf32.f32: round to the 10-bit tf32 mantissa, to nearest with ties away from zero; the low 13 bits end 0.
inline float __float_to_tf32(float value) {
  std::uint32_t u;
  std::memcpy(&u, &value, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) return value;  // inf, NaN
  u = (u + 0x1000u) & 0xffffe000u;
  float out;
  std::memcpy(&out, &u, 4);
  return out;
}

namespace detail {

template <class T>
struct Storage;  // what a fragment of element type T holds
template <>
struct Storage<__half> {
  using type = __half;
  static float value(__half v) { return static_cast<float>(v); }
};
template <>
struct Storage<__nv_bfloat16> {
  using type = __nv_bfloat16;
  static float value(__nv_bfloat16 v) { return static_cast<float>(v); }
};
template <>
struct Storage<precision::tf32> {
  using type = float;
  static float value(float v) {  // the tensor core reads the tf32 bits only
    std::uint32_t u;
    std::memcpy(&u, &v, 4);
    u &= 0xffffe000u;
    float out;
    std::memcpy(&out, &u, 4);
    return out;
  }
};
template <>
struct Storage<float> {
  using type = float;
  static float value(float v) { return v; }
};

template <class Use, int M, int N, int K>
struct Shape;
template <int M, int N, int K>
struct Shape<matrix_a, M, N, K> {
  static constexpr int kRows = M, kCols = K;
};
template <int M, int N, int K>
struct Shape<matrix_b, M, N, K> {
  static constexpr int kRows = K, kCols = N;
};
template <int M, int N, int K>
struct Shape<accumulator, M, N, K> {
  static constexpr int kRows = M, kCols = N;
};

template <class Use, int M, int N, int K, class T, class Layout>
constexpr bool supported() {
  constexpr bool operand = std::is_same_v<Use, matrix_a> || std::is_same_v<Use, matrix_b>;
  constexpr bool layout = std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>;
  if constexpr (operand) {
    if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) return M == 16 && N == 16 && K == 16 && layout;
    if constexpr (std::is_same_v<T, precision::tf32>) return M == 16 && N == 16 && K == 8 && layout;
    return false;
  } else if constexpr (std::is_same_v<Use, accumulator>) {
    return std::is_same_v<T, float> && std::is_void_v<Layout> && M == 16 && N == 16 && (K == 16 || K == 8);
  }
  return false;
}

// Every lane holds the whole tile, row-major (a GPU spreads it over the warp in an unspecified way; the kernels only
// touch fragment elements one by one, which means the same on either).
template <class Use, int M, int N, int K>
constexpr int kElements = Shape<Use, M, N, K>::kRows * Shape<Use, M, N, K>::kCols;

void check_pointer(const void* pointer, unsigned ldm, std::size_t element_bytes, const char* what);
int lane();

}  // namespace detail

template <class Use, int M, int N, int K, class T, class Layout = void>
class fragment {
  static_assert(detail::supported<Use, M, N, K, T, Layout>(),
                "this WMMA fragment is not emulated: m16n16k16 __half / __nv_bfloat16, m16n16k8 precision::tf32, "
                "float accumulators");

 public:
  using element_type = typename detail::Storage<T>::type;
  static constexpr int kRows = detail::Shape<Use, M, N, K>::kRows, kCols = detail::Shape<Use, M, N, K>::kCols;
  static constexpr int num_elements = kRows * kCols;
  element_type x[num_elements];
};

template <class Use, int M, int N, int K, class T, class Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f,
                          const typename fragment<Use, M, N, K, T, Layout>::element_type& value) {
  for (auto& element : f.x) element = value;
}

template <class Use, int M, int N, int K, class T, class Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f,
                             const typename fragment<Use, M, N, K, T, Layout>::element_type* pointer, unsigned ldm) {
  static_assert(!std::is_void_v<Layout>, "an accumulator's load_matrix_sync takes a layout_t");
  using Fragment = fragment<Use, M, N, K, T, Layout>;
  detail::check_pointer(pointer, ldm, sizeof(typename Fragment::element_type), "load_matrix_sync");
  for (int i = 0; i < Fragment::kRows; ++i)
    for (int j = 0; j < Fragment::kCols; ++j)
      f.x[i * Fragment::kCols + j] =
          std::is_same_v<Layout, row_major> ? pointer[i * ldm + j] : pointer[i + static_cast<std::size_t>(j) * ldm];
}

template <int M, int N, int K, class T, class LayoutA, class LayoutB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LayoutA>& a,
                     const fragment<matrix_b, M, N, K, T, LayoutB>& b, const fragment<accumulator, M, N, K, float>& c) {
  // every lane computes the whole tile here; each counts its share of the warp's 2 M N K operations
  metric_kernels::host_emulation::count_work(std::is_same_v<T, precision::tf32>
                                                 ? metric_kernels::host_emulation::Work::kDotTf32
                                                 : metric_kernels::host_emulation::Work::kDot16,
                                             2 * M * N * K / metric_kernels::host_emulation::kWarpSize);
  float av[M * K], bv[K * N], out[M * N];
  for (int e = 0; e < M * K; ++e) av[e] = detail::Storage<T>::value(a.x[e]);
  for (int e = 0; e < K * N; ++e) bv[e] = detail::Storage<T>::value(b.x[e]);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float sum = c.x[i * N + j];
      for (int k = 0; k < K; ++k) sum += av[i * K + k] * bv[k * N + j];  // exact products
      out[i * N + j] = sum;
    }
  std::memcpy(d.x, out, sizeof(out));
}

// An accumulator from memory: every lane reads the whole tile (the lanes' copies agree, as a warp's parts do), then
// the warp meets: on a GPU the lanes' parts meet in the mma_sync that consumes them, so no lane's later store to the
// tile (store_matrix_sync) can overtake another lane's read of it.
template <int M, int N, int K>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* pointer, unsigned ldm,
                             layout_t layout) {
  detail::check_pointer(pointer, ldm, sizeof(float), "load_matrix_sync");
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j)
      f.x[i * N + j] = pointer[layout == mem_row_major ? i * ldm + j : i + static_cast<std::size_t>(j) * ldm];
  metric_kernels::host_emulation::sync_warp();
}

// Lane l writes the elements e = l (mod 32): each element once, as the warp does together.
template <int M, int N, int K>
inline void store_matrix_sync(float* pointer, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                              layout_t layout) {
  detail::check_pointer(pointer, ldm, sizeof(float), "store_matrix_sync");
  for (int e = detail::lane(); e < M * N; e += metric_kernels::host_emulation::kWarpSize) {
    const int i = e / N, j = e % N;
    pointer[layout == mem_row_major ? i * ldm + j : i + static_cast<std::size_t>(j) * ldm] = f.x[e];
  }
}

}  // namespace nvcuda::wmma

// ---- runtime API --------------------------------------------------------------------------------------------------
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
};

enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr : int { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };

struct CUstream_st;
using cudaStream_t = CUstream_st*;
struct cudaLaunchAttribute;

struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  std::size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned int numAttrs;
};

const char* cudaGetErrorString(cudaError_t error);

inline cudaError_t cudaGetDevice(int* device) {  // one emulated device
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int /*device*/) {
  if (attribute != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *value = metric_kernels::host_emulation::shared_bytes_optin();
  return cudaSuccess;
}

template <class T>
inline cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return static_cast<cudaError_t>(
      metric_kernels::host_emulation::set_max_dynamic_shared_bytes(reinterpret_cast<const void*>(kernel), value));
}

// The type-safe launch of cuda_runtime.h: the arguments are converted to the kernel's parameter types once, and
// every thread gets them by value, as from a GPU's parameter space.
template <class... Expected, class... Actual>
inline cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Expected...),
                                      Actual&&... args) {
  static_assert(sizeof...(Expected) == sizeof...(Actual), "cudaLaunchKernelEx: wrong number of kernel arguments");
  if (config->numAttrs != 0) return cudaErrorInvalidValue;  // launch attributes are not emulated
  struct Call {
    void (*kernel)(Expected...);
    std::tuple<std::decay_t<Expected>...> params;
  };
  const Call call{kernel, std::tuple<std::decay_t<Expected>...>(std::forward<Actual>(args)...)};
  const metric_kernels::host_emulation::LaunchShape shape{config->gridDim, config->blockDim, config->dynamicSmemBytes,
                                                          reinterpret_cast<const void*>(kernel)};
  return static_cast<cudaError_t>(metric_kernels::host_emulation::launch(
      shape, [](const void* context) {
        const Call& c = *static_cast<const Call*>(context);
        std::apply(c.kernel, c.params);
      },
      &call));
}
