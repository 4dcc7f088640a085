"""Counts batch-hard's choices that miss the float64 optimum when the selection multiplies in tf32: the selection's
leaders alone, and the choices the loss makes (leader or runner-up, by the chosen-distance kernel's distances).

    python scripts/count_tf32_swaps.py BACKEND [SEEDS]

BACKEND is triton (on the CPU under the interpreter, its tf32 dots rounded by the test shim; on a GPU when one is
present and TRITON_INTERPRET is not 1), cuda-emulated, or cuda (a GPU). Each seed draws 1000 queries and 1007
references (D = 128, normal rows, normalised, 10 labels), 2000 choices. docs/backends.md quotes its output.
"""
import os
import sys

import torch


def main(backend: str, seeds: int) -> None:
    device = "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()
                                             and os.environ.get("TRITON_INTERPRET") != "1") else "cpu"
    if backend == "triton" and device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
        from metric_kernels.triton._interpreter import patch_interpreter
        patch_interpreter()
    import metric_kernels  # noqa: F401  (registers the ops)
    from metric_kernels._row_epilogues import better_candidate

    prefix = backend.replace("-", "_")
    select = getattr(torch.ops.metric_kernels, f"{prefix}_batch_hard_select")
    distances = getattr(torch.ops.metric_kernels, f"{prefix}_triplet_distances")
    allow_tf32 = () if backend == "triton" else (True,)
    torch.set_float32_matmul_precision("high")
    leaders_off = chosen_off = 0
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(1000, 128, generator=g), torch.randn(1007, 128, generator=g)
        labels, y_labels = torch.randint(0, 10, (1000,), generator=g), torch.randint(0, 10, (1007,), generator=g)
        on = [t.to(device) for t in (x, y, labels, y_labels)]
        choices = select(*on, -1, True, *allow_tf32)
        assert choices.shape[0] == 4, "the selection did not multiply in tf32"
        leader = distances(on[0], on[1], choices[0], choices[1], True)
        runner_up = distances(on[0], on[1], choices[2].clamp(min=0), choices[3].clamp(min=0), True)
        farthest = better_candidate(choices[0], leader[0], choices[2], runner_up[0], farthest=True).cpu()
        nearest = better_candidate(choices[1], leader[1], choices[3], runner_up[1], farthest=False).cpu()
        exact = torch.cdist(torch.nn.functional.normalize(x.double(), dim=1),
                            torch.nn.functional.normalize(y.double(), dim=1))
        positive = labels[:, None] == y_labels[None, :]
        best_far = torch.where(positive, exact, -1.0).argmax(dim=1)
        best_near = torch.where(positive, torch.inf, exact).argmin(dim=1)
        choices = choices.cpu()
        leaders_off += int((choices[0] != best_far).sum() + (choices[1] != best_near).sum())
        chosen_off += int((farthest != best_far).sum() + (nearest != best_near).sum())
    total = 2000 * seeds
    print(f"{backend} on {device}, tf32: leaders off the float64 optimum: {leaders_off} of {total} choices; "
          f"after the choice on exact distances: {chosen_off} of {total}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)
