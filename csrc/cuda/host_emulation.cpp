// The runtime of the host emulation (host_emulation.h): the thread pool that runs a launch's blocks, the barriers of
// a block and of its warps, the shared-memory buffer, the emulated launch checks, and the fp16 conversions.
#include "host_emulation.h"

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

// The block's dynamic shared memory. engine.cuh's block_shared() declares it as `extern __shared__ unsigned char
// shared_bytes[]` in namespace metric_kernels::cuda, which the emulated build of the kernels renames
// metric_kernels::cuda_emulated (CMakeLists.txt), so a module may hold the real kernels beside the emulated ones.
// One buffer serves every launch: launches are serialised and blocks run one after another. Page-aligned and a whole
// number of pages, so the pages past a launch's dynamic size can be made inaccessible while it runs.
namespace metric_kernels::cuda_emulated {
constexpr std::size_t kSharedPages = (host_emulation::kMaxDynamicSharedBytes + 4095) / 4096;
alignas(4096) unsigned char shared_bytes[kSharedPages * 4096];
}  // namespace metric_kernels::cuda_emulated

namespace metric_kernels::host_emulation {

using cuda_emulated::shared_bytes;
constexpr std::size_t kSharedCapacity = sizeof(shared_bytes);
constexpr unsigned char kUnwritten = 0xFF;  // shared memory before a block: NaN in fp16/bf16/fp32/fp64, -1 in ints
constexpr unsigned char kCanary = 0xA5;     // past the launch's dynamic size, up to its page end

// The barriers' completion steps: each checks that no thread of the group has returned while others wait (a
// __syncthreads or shuffle that not every thread reaches is undefined on a GPU; here it would deadlock).
struct GroupCompletion {
  std::atomic<int>* exited;
  int size;
  const char* what;
  void operator()() noexcept {
    const int gone = exited->load();
    if (gone != 0 && gone != size) fail(what);
  }
};

struct Warp {
  std::atomic<int> exited{0};
  int size = 0;
  std::optional<std::barrier<GroupCompletion>> barrier;
  alignas(64) unsigned char slots[2][kWarpSize][8];

  void reset(int lanes) {
    size = lanes;
    exited = 0;
    barrier.emplace(lanes, GroupCompletion{&exited, lanes,
                                           "__shfl_xor_sync with a lane that has returned from the kernel"});
  }
};

struct Block {
  int size = 0;
  std::atomic<int> exited{0};
  std::optional<std::barrier<GroupCompletion>> sync;
  std::vector<std::unique_ptr<Warp>> warps;

  void reset() {
    exited = 0;
    sync.emplace(size, GroupCompletion{&exited, size, "__syncthreads() while a thread of the block has returned"});
    for (int w = 0; w < static_cast<int>(warps.size()); ++w)
      warps[w]->reset(std::min(kWarpSize, size - w * kWarpSize));
  }
};

namespace {

struct Launch;

// Between two blocks: every thread of the finished block has arrived, none runs; set up the next block.
struct NextBlock {
  Launch* launch;
  void operator()() noexcept;
};

struct Launch {
  LaunchShape shape;
  void (*body)(const void*);
  const void* context;
  int threads;
  long long blocks;
  Block block;
  std::optional<std::barrier<NextBlock>> boundary;

  void prepare_block() {
    block.reset();
    std::memset(shared_bytes, kUnwritten, shape.dynamic_shared_bytes);
  }
};

void NextBlock::operator()() noexcept { launch->prepare_block(); }

uint3 unflatten(long long index, const dim3& extent) {
  return {static_cast<unsigned>(index % extent.x), static_cast<unsigned>(index / extent.x % extent.y),
          static_cast<unsigned>(index / (static_cast<long long>(extent.x) * extent.y))};
}

void run_thread(Launch& launch, int linear) {
  ThreadState& state = thread_state;
  state.thread_idx = unflatten(linear, launch.shape.block);
  state.block_dim = launch.shape.block;
  state.grid_dim = launch.shape.grid;
  state.linear = linear;
  state.lane = linear % kWarpSize;
  state.warp = linear / kWarpSize;
  state.block = &launch.block;
  for (long long b = 0; b < launch.blocks; ++b) {
    state.block_idx = unflatten(b, launch.shape.grid);
    state.exchange_parity = 0;
    launch.body(launch.context);
    if (!async_copies.empty()) fail("a thread ended its kernel with asynchronous copies not waited for");
    // Returned from the kernel: later barriers of this block no longer wait for this thread (and fail if they are
    // reached by the others).
    Warp& warp = *launch.block.warps[state.warp];
    warp.exited.fetch_add(1);
    warp.barrier->arrive_and_drop();
    launch.block.exited.fetch_add(1);
    launch.block.sync->arrive_and_drop();
    launch.boundary->arrive_and_wait();
  }
  state.block = nullptr;
}

// Worker threads, created when a launch first needs them and kept for the life of the process (never joined: the
// pool is leaked, so exit does not wait on threads parked in a futex). A launch wakes exactly the workers it needs,
// each through its own slot, and waits for all of them; idle workers never look at it.
class Pool {
 public:
  void run(Launch& launch) {
    while (static_cast<int>(workers_.size()) < launch.threads) {
      const int index = static_cast<int>(workers_.size());
      auto* slot = workers_.emplace_back(std::make_unique<std::atomic<Launch*>>(nullptr)).get();
      std::thread([this, slot, index] { work(*slot, index); }).detach();
    }
    remaining_.store(launch.threads);
    for (int i = 0; i < launch.threads; ++i) {
      workers_[i]->store(&launch);
      workers_[i]->notify_one();
    }
    for (int left = remaining_.load(); left != 0; left = remaining_.load()) remaining_.wait(left);
  }

 private:
  void work(std::atomic<Launch*>& slot, int index) {
    for (;;) {
      slot.wait(nullptr);
      run_thread(*slot.load(), index);
      slot.store(nullptr);  // before the count: the next launch may refill the slot once the count is 0
      if (remaining_.fetch_sub(1) == 1) remaining_.notify_one();
    }
  }

  std::vector<std::unique_ptr<std::atomic<Launch*>>> workers_;
  std::atomic<int> remaining_{0};
};

// The pool and the launch lock, replaced in a forked child: it has none of the parent's workers, and the lock may
// have been held by a parent thread at the fork (the old ones are leaked, never touched again).
std::mutex* the_launch_mutex = nullptr;
Pool* the_pool = nullptr;

void fresh_state() {
  the_launch_mutex = new std::mutex;
  the_pool = new Pool;
}

std::mutex& launch_mutex() {
  static const bool ready = [] {
    fresh_state();
    pthread_atfork(nullptr, nullptr, fresh_state);
    return true;
  }();
  (void)ready;
  return *the_launch_mutex;
}

Pool& pool() { return *the_pool; }  // after launch_mutex()

std::map<const void*, int>& max_dynamic_shared() {
  static auto* attributes = new std::map<const void*, int>;
  return *attributes;
}

std::size_t page_size() { return static_cast<std::size_t>(sysconf(_SC_PAGESIZE)); }

// Makes the shared pages past `bytes` (rounded up to a page) inaccessible for the launch's duration (an access
// faults) and fills the rest of the last page with a canary; the destructor restores them and checks the canary.
class SharedGuard {
 public:
  explicit SharedGuard(std::size_t bytes) : bytes_(bytes) {
    const std::size_t page = page_size();
    used_end_ = (bytes + page - 1) / page * page;
    if (used_end_ < kSharedCapacity && kSharedCapacity % page == 0 &&
        reinterpret_cast<std::uintptr_t>(shared_bytes) % page == 0) {
      protected_ = mprotect(shared_bytes + used_end_, kSharedCapacity - used_end_, PROT_NONE) == 0;
    }
    const std::size_t canary_end = std::min(used_end_, kSharedCapacity);
    std::memset(shared_bytes + bytes_, kCanary, canary_end - bytes_);
  }
  ~SharedGuard() {
    if (protected_) mprotect(shared_bytes + used_end_, kSharedCapacity - used_end_, PROT_READ | PROT_WRITE);
    const std::size_t canary_end = std::min(used_end_, kSharedCapacity);
    for (std::size_t i = bytes_; i < canary_end; ++i)
      if (shared_bytes[i] != kCanary) fail("a kernel wrote past its dynamic shared memory");
  }

 private:
  std::size_t bytes_, used_end_ = 0;
  bool protected_ = false;
};

}  // namespace

void fail(const char* what) {
  std::fprintf(stderr, "metric_kernels host emulation: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

const ThreadState& this_thread() {
  if (thread_state.block == nullptr) fail("a CUDA device function (__syncthreads, ...) called outside a kernel");
  return thread_state;
}

void sync_threads() { this_thread().block->sync->arrive_and_wait(); }

const void* warp_exchange(const void* value, std::size_t size, int lane_mask) {
  if (thread_state.block == nullptr) fail("__shfl_xor_sync outside a kernel");
  ThreadState& state = thread_state;
  Warp& warp = *state.block->warps[state.warp];
  if (warp.size != kWarpSize) fail("__shfl_xor_sync with a full mask in a partial warp");
  if (lane_mask < 0 || lane_mask >= kWarpSize) fail("__shfl_xor_sync: lane mask outside the warp");
  // Two buffers used in turn: a lane cannot overwrite the buffer of shuffle k (at shuffle k + 2) before every lane
  // has read it, since reading comes before arriving at shuffle k + 1's barrier.
  auto& slots = warp.slots[state.exchange_parity];
  state.exchange_parity ^= 1;
  std::memcpy(slots[state.lane], value, size);
  warp.barrier->arrive_and_wait();
  return slots[state.lane ^ lane_mask];
}

void sync_warp() {
  if (thread_state.block == nullptr) fail("a warp-collective call outside a kernel");
  Warp& warp = *thread_state.block->warps[thread_state.warp];
  if (warp.size != kWarpSize) fail("a warp-collective call in a partial warp");
  warp.barrier->arrive_and_wait();
}

int shared_bytes_optin() {
  const char* text = std::getenv("METRIC_KERNELS_EMULATED_SHARED_BYTES");
  if (text == nullptr || *text == '\0') return kMaxDynamicSharedBytes;
  const long bytes = std::strtol(text, nullptr, 10);
  return static_cast<int>(std::clamp<long>(bytes, kDefaultDynamicSharedBytes, kMaxDynamicSharedBytes));
}

int set_max_dynamic_shared_bytes(const void* kernel, int bytes) {
  if (bytes < 0 || bytes > shared_bytes_optin()) return cudaErrorInvalidValue;
  const std::lock_guard<std::mutex> lock(launch_mutex());
  max_dynamic_shared()[kernel] = bytes;
  return cudaSuccess;
}

int launch(const LaunchShape& shape, void (*body)(const void*), const void* context) {
  const std::lock_guard<std::mutex> lock(launch_mutex());
  const dim3 &grid = shape.grid, &block = shape.block;
  const long long threads = static_cast<long long>(block.x) * block.y * block.z;
  if (threads <= 0 || threads > kMaxThreadsPerBlock || block.z > 64) return cudaErrorInvalidConfiguration;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    return cudaErrorInvalidConfiguration;
  const auto attribute = max_dynamic_shared().find(shape.kernel);
  const int allowed = attribute == max_dynamic_shared().end() ? kDefaultDynamicSharedBytes : attribute->second;
  if (shape.dynamic_shared_bytes > static_cast<std::size_t>(std::max(allowed, kDefaultDynamicSharedBytes)))
    return cudaErrorInvalidValue;

  Launch launch{shape, body, context, static_cast<int>(threads),
                static_cast<long long>(grid.x) * grid.y * grid.z, {}, {}};
  launch.block.size = launch.threads;
  for (int w = 0; w * kWarpSize < launch.threads; ++w) launch.block.warps.push_back(std::make_unique<Warp>());
  launch.boundary.emplace(launch.threads, NextBlock{&launch});
  const SharedGuard guard(shape.dynamic_shared_bytes);
  launch.prepare_block();
  pool().run(launch);
  return cudaSuccess;
}

}  // namespace metric_kernels::host_emulation

namespace nvcuda::wmma::detail {

// WMMA's requirements on memory operands: a 256-bit aligned pointer, a leading dimension of a multiple of 16 bytes.
void check_pointer(const void* pointer, unsigned ldm, std::size_t element_bytes, const char* what) {
  char message[160];
  if (reinterpret_cast<std::uintptr_t>(pointer) % 32 != 0) {
    std::snprintf(message, sizeof(message), "%s: the pointer is not 256-bit aligned", what);
    metric_kernels::host_emulation::fail(message);
  }
  if (ldm * element_bytes % 16 != 0) {
    std::snprintf(message, sizeof(message), "%s: ldm %u is not a multiple of 16 bytes", what, ldm);
    metric_kernels::host_emulation::fail(message);
  }
}

int lane() { return metric_kernels::host_emulation::this_thread().lane; }

}  // namespace nvcuda::wmma::detail

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
  }
  return "unknown error";
}

namespace metric_kernels::host_emulation {

std::uint16_t float_to_half_bits(float value) {
  std::uint32_t u;
  std::memcpy(&u, &value, 4);
  const std::uint32_t sign = (u >> 16) & 0x8000u, magnitude = u & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return 0x7fff;                                  // NaN
  if (magnitude >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (magnitude < 0x38800000u) {  // below 2^-14: a subnormal half (or zero), in units of 2^-24
    float scaled;
    std::memcpy(&scaled, &magnitude, 4);
    scaled *= 16777216.0f;  // exact: a power of two, and the result is a normal float
    return static_cast<std::uint16_t>(sign | static_cast<std::uint32_t>(std::nearbyint(scaled)));
  }
  std::uint32_t half = ((magnitude >> 23) - 112u) << 10 | ((magnitude >> 13) & 0x3ffu);
  const std::uint32_t rest = magnitude & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;  // a carry into the exponent is right
  return static_cast<std::uint16_t>(sign | half);
}

float half_bits_to_float(std::uint16_t bits) {
  const std::uint32_t sign = static_cast<std::uint32_t>(bits & 0x8000u) << 16;
  const std::uint32_t exponent = (bits >> 10) & 0x1fu, mantissa = bits & 0x3ffu;
  std::uint32_t u;
  if (exponent == 0x1f) {
    u = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * (1.0f / 16777216.0f);  // exact
    std::memcpy(&u, &magnitude, 4);
    u |= sign;
  } else {
    u = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  }
  float value;
  std::memcpy(&value, &u, 4);
  return value;
}

}  // namespace metric_kernels::host_emulation
