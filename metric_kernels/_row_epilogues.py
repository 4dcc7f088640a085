"""Per-row losses from the O(N) statistics the fused kernels produce, shared by every fused backend.

A fused backend computes, per query row, a few reductions over its row of the similarity matrix (log-sum-exps, a sum,
the hardest pair); these functions finish each loss in plain torch on vectors of length N, so autograd carries the
upstream gradient of every statistic back into the kernels' backward.
"""
import torch
import torch.nn.functional as F

NORM_EPS = 1e-12  # F.normalize's default: rows are divided by max(||row||, eps)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the fused backends' row statistics and epilogues: float64 for float64 rows, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def circle_from_stats(lse_positive, lse_negative, positives, negatives):
    # F.softplus (linear above 20) on purpose: it is what PML's Circle loss applies.
    valid = (positives > 0) & (negatives > 0)
    return torch.where(valid, F.softplus(lse_positive + lse_negative), torch.zeros_like(lse_positive))


def supcon_from_stats(lse_all, positive_sum, positives, temperature):
    count = positives.clamp(min=1).to(lse_all.dtype)
    return torch.where(positives > 0, lse_all - positive_sum / (temperature * count), torch.zeros_like(lse_all))


def log_one_plus_exp_as_pml(value):
    """log(1 + exp(value)) rounded as PML's logsumexp with an added 0 rounds it: below 0 as log(1 + exp(value)), so
    that a term under half an ulp of 1 gives exactly 0, as in PML (AvgNonZeroReducer counts the rows that are not 0);
    -inf (an empty sum) gives 0."""
    positive = value > 0
    return torch.where(positive, value + torch.log1p(torch.exp(-value.abs())),
                       torch.log(1 + torch.exp(torch.where(positive, -value, value))))


def multi_similarity_from_stats(lse_positive, lse_negative, alpha, beta, base):
    """(1/alpha) log(1 + sum exp(-alpha (s - base))) + (1/beta) log(1 + sum exp(beta (s - base))) from the kernels'
    unshifted log-sum-exps of -alpha s and beta s (-inf for an empty side)."""
    return (log_one_plus_exp_as_pml(lse_positive + alpha * base) / alpha
            + log_one_plus_exp_as_pml(lse_negative - beta * base) / beta)


def generalized_lifted_structure_from_stats(lse_positive, lse_negative, pos_margin, neg_margin):
    """relu(A + B) with A = log sum over positives of exp(pos_margin - v) and B = log sum over negatives of
    exp(v - neg_margin) (margins in pair-value form), from the kernels' log-sum-exps of -v and v (-inf for an empty
    side, which contributes 0 as in PML)."""
    zero = torch.zeros_like(lse_positive)
    positive_part = torch.where(lse_positive > float("-inf"), lse_positive + pos_margin, zero)
    negative_part = torch.where(lse_negative > float("-inf"), lse_negative - neg_margin, zero)
    return torch.relu(positive_part + negative_part)


def proxy_anchor_from_stats(lse_positive, lse_negative):
    # log(1 + exp(lse)) exactly, as PML's logsumexp with an added 0 computes it (F.softplus would return lse itself
    # above 20); lse = -inf (a proxy with no positive, or no negative, in the batch) gives log(1 + 0) = 0.
    zero = torch.zeros((), dtype=lse_positive.dtype, device=lse_positive.device)
    return torch.logaddexp(lse_positive, zero), torch.logaddexp(lse_negative, zero)


def nca_from_stats(lse_positive, lse_negative):
    """(losses, kept) of NCA from the two log-sum-exps of softmax_scale * v over a query's positives and negatives:
    PML's -log(sum of the positives' softmax) = log(1 + exp(lse_negative - lse_positive)), rounded as PML rounds it
    (log_one_plus_exp_as_pml: exactly 0 where the positives' share rounds to 1, so that AvgNonZeroReducer counts what
    PML counts). PML leaves out (from the losses and from MeanReducer's count) a query whose positives' softmax sums
    to exactly 0: one without a positive, or whose positives' probability underflows (a loss above about 103 in
    float32, 745 in float64); kept says which queries count, judged in the statistics' dtype. The left-out queries'
    losses are 0 with a zero gradient."""
    with torch.no_grad():  # NaN (no positive: -inf - -inf) is not kept
        kept = torch.exp(lse_positive - torch.logaddexp(lse_positive, lse_negative)) > 0
    zero = torch.zeros_like(lse_positive)
    excess = torch.where(kept, lse_negative, zero) - torch.where(kept, lse_positive, zero)
    return torch.where(kept, log_one_plus_exp_as_pml(excess), zero), kept


def batch_hard_from_choices(x, y, hardest_positive, hardest_negative, margin, soft):
    """Losses of the chosen triplets (index -1: none) of rows as the losses compare them (the cpu backend's, already
    normalised where the distance normalises), recomputing only the 2 N chosen distances: O(N D) backward, and
    ||x_i - y_j|| has gradient 0 where it is 0."""
    positive_distance = torch.linalg.vector_norm(x - y[hardest_positive.clamp(min=0)], dim=1)
    negative_distance = torch.linalg.vector_norm(x - y[hardest_negative.clamp(min=0)], dim=1)
    return triplet_losses(positive_distance, negative_distance, hardest_positive, hardest_negative, margin, soft)


def hardest_triplet_losses(choices, distances, margin, soft):
    """Losses of batch-hard's chosen triplets from a selection op's choices ([2, N]: farthest positive, nearest
    negative, -1 for none; or [4, N] from a selection on tf32 products, rows 2 and 3 each side's runner-up) and
    `distances(positive, negative)` -> [2, N], the chosen distances of in-range indices computed from the rows
    (differentiable). tf32's error can swap two near-tied candidates, so a runner-up replaces its leader where its
    distance as `distances` computes it is better, or equal at a lower index: the tf32 ranking only decides which
    two are compared. The candidates' distances are taken without autograd; the chosen pairs' once more with it."""
    positive, negative = choices[0], choices[1]
    if choices.shape[0] == 4:
        with torch.no_grad():
            leaders = distances(positive.clamp(min=0), negative.clamp(min=0))
            runners_up = distances(choices[2].clamp(min=0), choices[3].clamp(min=0))
        positive = better_candidate(positive, leaders[0], choices[2], runners_up[0], farthest=True)
        negative = better_candidate(negative, leaders[1], choices[3], runners_up[1], farthest=False)
    chosen = distances(positive.clamp(min=0), negative.clamp(min=0))
    return triplet_losses(chosen[0], chosen[1], positive, negative, margin, soft)


def better_candidate(leader, leader_distance, runner_up, runner_up_distance, farthest: bool):
    """Per query the leader, or its runner-up where that one's distance is better (farther for the positive side),
    or equal at a lower index (the order every selection keeps); a runner-up of -1 (none) never replaces."""
    better = runner_up_distance > leader_distance if farthest else runner_up_distance < leader_distance
    tie = (runner_up_distance == leader_distance) & (runner_up < leader)
    return torch.where((runner_up >= 0) & (better | tie), runner_up, leader)


def triplet_backward_inputs(grad, distances, positive, negative, references: int, own_entries: bool = False):
    """What the chosen-distance kernels' backward takes besides the rows (the Triton and CUDA ones alike): the
    coefficients g / d of the 2 N chosen distances (0 where d = 0: ||u - v|| has gradient 0 there, as torch.cdist),
    and each reference's entries in a fixed order: `order` (entry indices sorted stably by the reference they add to)
    and `offsets` (references + 1: reference j's entries are order[offsets[j]:offsets[j+1]]). Entry e < 2 N is a
    choice: query e % N chose reference (positive, negative)[e // N][e % N] with coefficient coefficients.flat[e].
    own_entries (the references are the queries) adds entries 2 N + e: query e % N's own part, added to its own row
    j = e % N with the same coefficient, against the row it chose. O(N) integers, no N x D tensor."""
    coefficients = torch.where(distances > 0, grad.to(distances.dtype) / distances, torch.zeros_like(distances))
    keys = torch.cat([positive, negative])  # the reference each entry adds to
    if own_entries:
        queries = torch.arange(positive.shape[0], device=keys.device)
        keys = torch.cat([keys, queries, queries])
    order = torch.argsort(keys, stable=True)
    offsets = torch.searchsorted(keys[order], torch.arange(references + 1, device=keys.device))
    return coefficients.contiguous(), order, offsets


def triplet_losses(positive_distance, negative_distance, hardest_positive, hardest_negative, margin, soft):
    """relu (or softplus, when soft) of d_ap - d_an + margin; 0 for a query without a positive or a negative."""
    valid = (hardest_positive >= 0) & (hardest_negative >= 0)
    violation = positive_distance - negative_distance + margin
    losses = F.softplus(violation) if soft else torch.relu(violation)
    return torch.where(valid, losses, torch.zeros_like(losses))
