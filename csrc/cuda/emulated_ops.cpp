// The cuda_emulated_* ops: ops.cpp's glue, compiled a second time over the CUDA kernels built for the host emulation
// (host_emulation.h; CMakeLists.txt compiles every *.cu of this directory that way). They take CPU tensors and run the
// kernels' own code, a block's threads as host threads, so the kernels are checked against the reference without a
// GPU (backend "cuda-emulated", metric_kernels/cuda_emulated.py).
#define METRIC_KERNELS_HOST_EMULATION 1
#include "ops.cpp"
