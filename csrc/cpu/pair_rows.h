// Fused CPU kernels: the engine of epilogue.h over row blocks, OpenMP across blocks, tile GEMMs through
// PairRowsParams::gemm, the per-pair math in vectorised row loops (vec_exp.h). Extra memory: a few tiles per thread,
// and in the backward of a small problem (N x M <= 4M entries, at most 16 MiB in float32) the whole dS, which saves
// recomputing S and the exponentials for the dY pass; above that, never N x M.
#pragma once

#include <cstdint>

#include "../params.h"

namespace metric_kernels::cpu {

// stats: 3 x N (see epilogue.h). The distances (p.pair_value 1, 2) need p.x_sq and p.y_sq.
template <typename T>
void lse_rows_forward(const PairRowsParams<T>& p, T* stats);

// dX over row blocks, then dY over column blocks (each block summed in a fixed order: deterministic, no atomics).
// N x M <= 4M entries: dS is formed once and kept (dX + dY = (dS + dS^T) X when the references are the queries).
template <typename T>
void lse_rows_backward(const PairRowsBackwardParams<T>& p);

// choices: 2 x N, the farthest positive and nearest negative reference per query (-1: none), by the squared
// distances from p.x_sq and p.y_sq. Ties go to the lowest index.
template <typename T>
void batch_hard_select(const PairRowsParams<T>& p, int64_t* choices);

}  // namespace metric_kernels::cpu
