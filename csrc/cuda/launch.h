// Entry points of the CUDA kernels, free of torch and of CUDA's own headers, so the torch glue (ops.cpp) builds with
// the host compiler alone. Each launches on `stream` (a cudaStream_t) and returns a cudaError_t as an int (0: success).
#pragma once

#include <cstdint>

#include "../params.h"

namespace metric_kernels::cuda {

// stats: 3 x N in the accumulation type (epilogue.h). The distances (p.pair_value 1, 2) and p.normalize need p.x_sq
// and p.y_sq (squared_row_norms).
int lse_rows_forward(const CudaPairRowsParams& p, void* stats, void* stream);

// Deterministic: a dX pass over row blocks, then a dY pass over column blocks, each summing in a fixed order.
// p.atomic: dY is added from the dX pass with atomics (the caller zeroes dy; when dy is dx, dx is zeroed too).
// Also the triplet margin loss's backward (p.pair.kind kTripletMargin, with p.triplet, p.table and p.weights).
int lse_rows_backward(const CudaPairRowsBackwardParams& p, void* stream);

// The triplet margin loss over every triplet (p.kind kTripletMargin, p.a the margin; distances and normalize as for
// lse_rows_forward): stats 2 x N (each anchor's sum of triplet losses, how many are nonzero), table and weights
// N x slots.slot_count, all in the accumulation type and written whole (metric_kernels/_fused.py's contract).
int triplet_margin_forward(const CudaPairRowsParams& p, const CudaTripletSlots& slots, void* stats, void* table,
                           void* weights, void* stream);

// choices: batch_hard_choice_rows(p.operand) x N int64, the farthest positive and nearest negative per query (-1:
// none), ties to the lowest index, by the squared distances from p.x_sq and p.y_sq (of the normalised rows where
// p.normalize); for tf32 products (whose error can swap near-tied candidates) rows 2 and 3 hold their runners-up.
int64_t batch_hard_choice_rows(Operand operand);
int batch_hard_select(const CudaPairRowsParams& p, int64_t* choices, void* stream);

// out: 2 x N in the accumulation type, ||u_i - v_positive(i)|| then ||u_i - v_negative(i)|| (direct differences).
int triplet_distances(const CudaTripletParams& p, void* out, void* stream);

// (dX, dY) of those distances given p.coefficients: dX per row, dY per reference over its choosers in p.order
// (deterministic, no atomics); p.same: the whole gradient into dx in one pass.
int triplet_distances_backward(const CudaTripletBackwardParams& p, void* stream);

// out[i] = |row i|^2 in the accumulation type (float64 for fp64 operands, else float32) of `count` rows of d elements
// stored as `operand` says, row stride `stride`, unit column stride: what CudaPairRowsParams' x_sq and y_sq hold.
int squared_row_norms(Operand operand, const void* rows, int64_t count, int64_t d, int64_t stride, void* out,
                      void* stream);

// Whether an atomic backward exists for this operand (fp64 has none: its tiles would need 174 KB of shared memory).
bool supports_atomic_backward(Operand operand);

// The columns of D one block of the atomic backward holds (256: two slices' accumulators in registers, two in shared
// memory): above that its blocks along D each recompute S, and the deterministic backward does no more products
// (4 matmul-equivalents either way) without the atomics.
int64_t atomic_backward_span(Operand operand);

// Dynamic shared memory per block of the backward for this operand at this D (the atomic pass's grows with D up to
// 256), and the most a block on `device` may opt in to (99 KB on sm_86/sm_89/sm_120, 163 KB on sm_80, 227 KB on sm_90);
// the forward fits every sm_80+ GPU (its kernels keep their rows resident only where the device allows it).
int64_t backward_shared_bytes(Operand operand, bool atomic, int64_t d);
int64_t shared_bytes_per_block(int device);
// The same for the current device (0 where it cannot be read): the forward kernels' launches read it.
int64_t shared_bytes_of_current_device();

// The margin-softmax classifiers: stats 2 x N in the accumulation type (params.h); p.x_inverse and p.w_inverse are
// written first. Labels must lie in [0, classes) (the Python layer checks) and sub_centers in [1, 64].
int margin_softmax_forward(const CudaMarginSoftmaxParams& p, void* stats, void* stream);

// dX over row blocks x D slices, then dW over class tiles x D slices, each summed in a fixed order (deterministic);
// or, with p.atomic (not fp64: supports_atomic_backward; p.dw zeroed, both gradients wanted), dW added from the dX
// pass through atomics, in blocks of atomic_backward_span(operand) columns of D and backward_shared_bytes(operand,
// true, d) of shared memory, as the pair losses' atomic pass.
int margin_softmax_backward(const CudaMarginSoftmaxBackwardParams& p, void* stream);

const char* error_string(int code);

}  // namespace metric_kernels::cuda
