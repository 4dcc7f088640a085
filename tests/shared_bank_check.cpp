// The shared-memory banks each warp touches in the CUDA kernels' tiles (csrc/cuda/tile_mma.cuh, engine.cuh), from the
// same index functions and layout constants the kernels use; tests/test_cuda_compile.py builds and runs it. A request
// is one access of every lane of a warp; its conflict degree is the most distinct 4-byte words that share a bank
// (32 banks), for 8-byte accesses per half-warp and pair of banks. WMMA's fragment loads and stores are modelled as
// ldmatrix moves them: 8 rows of 16 bytes at a time, conflict-free when those rows start in distinct 16-byte
// columns of the banks. Prints every request with a conflict and exits non-zero if there is one.
#include <cstdio>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "cuda/engine.cuh"

namespace mk = metric_kernels::cuda;

namespace {

int failures = 0;

// addresses: one byte address per lane of a warp (-1: the lane makes no access)
int conflict_degree(const std::vector<long>& addresses, int size) {
  int worst = 1;
  const int groups = size == 8 ? 2 : 1, lanes = 32 / groups;
  for (int group = 0; group < groups; ++group) {
    std::map<int, std::set<long>> by_bank;
    for (int lane = group * lanes; lane < (group + 1) * lanes; ++lane) {
      if (addresses[lane] < 0) continue;
      const long unit = addresses[lane] / (size == 8 ? 8 : 4);
      by_bank[static_cast<int>(unit % (size == 8 ? 16 : 32))].insert(unit);
    }
    for (const auto& [bank, units] : by_bank) worst = std::max(worst, static_cast<int>(units.size()));
  }
  return worst;
}

void expect_free(const std::string& what, const std::vector<long>& addresses, int size) {
  const int degree = conflict_degree(addresses, size);
  if (degree > 1) {
    std::printf("%s: %d-way bank conflict\n", what.c_str(), degree);
    ++failures;
  }
}

// Every warp of the block, every step: `address(thread, step)` the byte offset thread reads (or -1).
template <class Address>
void check_requests(const std::string& what, int steps, int size, Address&& address) {
  for (int warp = 0; warp < mk::kThreads / 32; ++warp)
    for (int step = 0; step < steps; ++step) {
      std::vector<long> addresses(32);
      for (int lane = 0; lane < 32; ++lane) addresses[lane] = address(warp * 32 + lane, step);
      expect_free(what + " (warp " + std::to_string(warp) + ", step " + std::to_string(step) + ")", addresses, size);
    }
}

// A SIMT product step reads A[row0 + i][kk] and B[kk][col0 + 16 j] (layouts as the kernels call mma).
template <class T>
void check_simt(const char* name) {
  using Policy = mk::SimtTile<T>;
  using Layout = mk::SharedLayout<Policy>;
  const int size = sizeof(T);
  const auto element = [](bool column_major, int ld, int i, int j) -> long {
    return column_major ? i + static_cast<long>(j) * ld : static_cast<long>(i) * ld + j;
  };
  struct Operand {
    const char* what;
    bool column_major;
    int ld;
  };
  // A: X's chunk (S = X Y^T) or the forward's resident rows, dS (dX = dS Y), dS read transposed (dY = dS^T X), X's
  // rows read transposed, resident or loaded (the classifiers' atomic dW = X^T dS); B: Y's chunk transposed, and the
  // 64-wide tiles of Y or X (dX, dY) or dS (dW).
  for (const Operand a : {Operand{"A x_chunk", false, Layout::kChunkLd},
                          Operand{"A resident_rows", false, Layout::kResidentLd},
                          Operand{"A ds", false, Layout::kTileLd}, Operand{"A ds^T", true, Layout::kTileLd},
                          Operand{"A resident_rows^T", true, Layout::kResidentLd},
                          Operand{"A out_rows^T", true, Layout::kTileLd}})
    for (int i = 0; i < Policy::kRows; ++i)
      check_requests(std::string(name) + " " + a.what + " row " + std::to_string(i), 4, size, [&](int t, int kk) {
        return element(a.column_major, a.ld, Policy::row0_of(t) + i, kk) * size;
      });
  for (const Operand b : {Operand{"B y_chunk^T", true, Layout::kChunkLd}, Operand{"B out", false, Layout::kTileLd}})
    for (int j = 0; j < Policy::kCols; ++j)
      check_requests(std::string(name) + " " + b.what + " column " + std::to_string(j), 4, size, [&](int t, int kk) {
        return element(b.column_major, b.ld, kk, Policy::col0_of(t) + Policy::kColStride * j) * size;
      });
  // C: S, and the atomic dX pass's accumulator slices in shared memory (loaded and stored alike)
  for (int i = 0; i < Policy::kRows; ++i)
    check_requests(std::string(name) + " store C row " + std::to_string(i), Policy::kCols, size, [&](int t, int j) {
      return (static_cast<long>(Policy::row0_of(t) + i) * Layout::kAccLd + Policy::col0_of(t) +
              Policy::kColStride * j) * size;
    });
}

// WMMA fragments: 16 x 16 (or 16 x 8) blocks of a tile, moved 8 rows of 16 bytes at a time.
template <class Policy>
void check_fragment_rows(const std::string& what, int ld, int element_size) {
  for (int row0 = 0; row0 < mk::kTile; row0 += 8) {
    std::set<long> columns;
    for (int r = row0; r < row0 + 8; ++r) columns.insert(static_cast<long>(r) * ld * element_size / 16 % 8);
    if (columns.size() < 8) {
      std::printf("%s: rows %d..%d share 16-byte bank columns\n", what.c_str(), row0, row0 + 7);
      ++failures;
    }
  }
  if (ld * element_size % 16 != 0) {
    std::printf("%s: leading dimension %d is not a multiple of 16 bytes\n", what.c_str(), ld);
    ++failures;
  }
}

template <class Policy>
void check_wmma(const char* name) {
  using Layout = mk::SharedLayout<Policy>;
  const int operand = sizeof(typename Policy::Operand), acc = sizeof(typename Policy::Acc);
  check_fragment_rows<Policy>(std::string(name) + " x_chunk / y_chunk", Layout::kChunkLd, operand);
  check_fragment_rows<Policy>(std::string(name) + " resident_rows", Layout::kResidentLd, operand);
  check_fragment_rows<Policy>(std::string(name) + " ds / out / out_rows", Layout::kTileLd, operand);
  check_fragment_rows<Policy>(std::string(name) + " S, accumulator slices (accumulator loads and stores)",
                              Layout::kAccLd, acc);
}

// The epilogues: two threads per row of S, a thread's k-th column from epilogue_column_of; the same pattern writes dS.
template <class Policy>
void check_epilogue(const char* name) {
  using Layout = mk::SharedLayout<Policy>;
  const int acc = sizeof(typename Policy::Acc), operand = sizeof(typename Policy::Operand);
  check_requests(std::string(name) + " epilogue reads of S", mk::kTile / 2, acc, [&](int t, int k) {
    return (static_cast<long>(mk::epilogue_row_of(t)) * Layout::kAccLd + mk::epilogue_column_of<Policy>(t, k)) * acc;
  });
  check_requests(std::string(name) + " epilogue writes of dS", mk::kTile / 2, operand, [&](int t, int k) {
    return (static_cast<long>(mk::epilogue_row_of(t)) * Layout::kTileLd + mk::epilogue_column_of<Policy>(t, k)) *
           operand;
  });
}

// The classifiers' dW passes (atomic and deterministic) read the staged X^T dS (S, [e][j]) with consecutive threads
// on consecutive columns j (margin_softmax.cu, write_weight_gradient), 64 x 64 elements over the block's threads.
template <class Policy>
void check_weight_gradient_reads(const char* name) {
  using Layout = mk::SharedLayout<Policy>;
  const int acc = sizeof(typename Policy::Acc);
  check_requests(std::string(name) + " dW reads of S", mk::kTile * mk::kTile / mk::kThreads, acc,
                 [&](int t, int step) {
                   const int index = t + step * mk::kThreads, j = index % mk::kTile, e = index / mk::kTile;
                   return (static_cast<long>(e) * Layout::kAccLd + j) * acc;
                 });
}

}  // namespace

int main() {
  check_simt<float>("SimtTile<float>");
  check_simt<double>("SimtTile<double>");
  check_wmma<mk::WmmaTile<__half>>("WmmaTile<__half>");
  check_wmma<mk::WmmaTile<__nv_bfloat16>>("WmmaTile<__nv_bfloat16>");
  check_wmma<mk::WmmaTile<mk::Tf32>>("WmmaTile<Tf32>");
  check_epilogue<mk::SimtTile<float>>("SimtTile<float>");
  check_epilogue<mk::SimtTile<double>>("SimtTile<double>");
  check_epilogue<mk::WmmaTile<__half>>("WmmaTile<__half>");
  check_epilogue<mk::WmmaTile<__nv_bfloat16>>("WmmaTile<__nv_bfloat16>");
  check_epilogue<mk::WmmaTile<mk::Tf32>>("WmmaTile<Tf32>");
  check_weight_gradient_reads<mk::SimtTile<float>>("SimtTile<float>");
  check_weight_gradient_reads<mk::WmmaTile<__half>>("WmmaTile<__half>");
  check_weight_gradient_reads<mk::WmmaTile<mk::Tf32>>("WmmaTile<Tf32>");
  std::printf("%s\n", failures ? "conflicts" : "ok");
  return failures != 0;
}
