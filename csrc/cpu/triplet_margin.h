// Fused CPU kernels of the triplet margin loss over every triplet (params.h, TripletMarginParams): per block of
// anchors (query rows) two sweeps of similarity tiles, the first writing the anchors' positive tables, the second
// meeting every negative with them; never a triplet tensor, nor N x M beyond the backward's kept dS (pair_tiles.h).
// Extra memory of the forward: a few tiles per thread, besides the N x K table and weights it returns.
#pragma once

#include "../params.h"

namespace metric_kernels::cpu {

// stats: 2 x N (0: the sum of each anchor's triplet losses, 1: how many of them are nonzero); table and weights:
// N x K, written whole (-inf and 0 where no positive is). rank must be _pairs.positive_slots' and K must cover every
// query's label (the bindings check both).
template <typename T>
void triplet_margin_forward(const TripletMarginParams<T>& p, T* stats, T* table, T* weights);

// pair_tiles.h's backward passes with the triplets' dS: dL/dv_ap = -g_a weights[a, rank[p]],
// dL/dv_an = g_a sum_r f'(v_an + table[a, r]). Deterministic, as lse_rows_backward.
template <typename T>
void triplet_margin_backward(const TripletMarginBackwardParams<T>& b);

}  // namespace metric_kernels::cpu
