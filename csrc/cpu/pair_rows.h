// Fused CPU kernels: the engine of epilogue.h over row blocks, OpenMP across blocks, tile GEMMs through
// PairRowsParams::gemm. Extra memory is two BLOCK_ROWS x BLOCK_COLS tiles per thread, never N x M.
#pragma once

#include <cstdint>

#include "../params.h"

namespace metric_kernels::cpu {

// stats: 3 x N (see epilogue.h). The distances (p.pair_value 1, 2) need p.x_sq and p.y_sq.
template <typename T>
void lse_rows_forward(const PairRowsParams<T>& p, T* stats);

// dX over row blocks, then dY over column blocks (each block summed in a fixed order: deterministic, no atomics).
template <typename T>
void lse_rows_backward(const PairRowsBackwardParams<T>& p);

// choices: 2 x N, the farthest positive and nearest negative reference per query (-1: none), by the squared
// distances from p.x_sq and p.y_sq. Ties go to the lowest index.
template <typename T>
void batch_hard_select(const PairRowsParams<T>& p, int64_t* choices);

}  // namespace metric_kernels::cpu
