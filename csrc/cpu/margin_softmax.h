// Fused CPU kernels of the margin-softmax classifiers (ArcFace, CosFace, SubCenterArcFace, NormalizedSoftmax,
// SphereFace, LargeMarginSoftmax): the cosines (or, for a side left raw, the products) of the queries against W's
// columns in tiles, an online log-sum-exp per query over the classes other than
// its label, and the label's cosine; never the N x C logits. What the margin does with these two statistics is
// decided in Python (metric_kernels/functional.py), on O(N) vectors.
#pragma once

#include "../params.h"

namespace metric_kernels::cpu {

// stats: 2 x N (params.h, MarginSoftmaxBackwardParams). Labels must lie in [0, classes).
template <typename T>
void margin_softmax_forward(const MarginSoftmaxParams<T>& p, T* stats);

// dX over row blocks (times class splits, for small batches), then dW over class tiles; every sum in a fixed order
// that does not depend on the number of threads: deterministic, no atomics. Each pass recomputes the tiles.
template <typename T>
void margin_softmax_backward(const MarginSoftmaxBackwardParams<T>& b);

}  // namespace metric_kernels::cpu
