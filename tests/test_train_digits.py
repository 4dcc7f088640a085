"""The losses train: examples/train_digits.py, shortened (3 epochs, a few seconds per loss and backend), lifts
held-out Recall@1 on scikit-learn's digits above the untrained network's, and every backend usable here reaches the
reference's Recall@1 within noise. Under this suite's TRITON_INTERPRET=1 that includes "triton" (its interpreter
takes about 4 s per loss at this size); a built "cpu" backend joins automatically."""
import functools
import importlib.util
import pathlib

import pytest

pytest.importorskip("sklearn")

_PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"
_spec = importlib.util.spec_from_file_location("train_digits", _PATH)
train_digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_digits)

EPOCHS = 3
NOISE = 0.02  # Recall@1 on 545 held-out images: about 11 images


@functools.lru_cache(maxsize=None)
def _data():
    return train_digits.load(seed=0)


@functools.lru_cache(maxsize=None)
def _train(loss, backend):
    return train_digits.train(loss, backend, epochs=EPOCHS, seed=0, data=_data())


@pytest.mark.parametrize("loss", train_digits.LOSSES)
def test_reference_learns(loss):
    r = _train(loss, "reference")
    assert r["last_epoch_loss"] < r["first_epoch_loss"], r
    assert r["recall_at_1"] > r["recall_at_1_before"] + 0.02, r
    assert r["recall_at_1"] > 0.93, r


_OTHERS = [b for b in train_digits.usable_backends("cpu") if b != "reference"]


@pytest.mark.skipif(not _OTHERS, reason="no backend other than the reference can run on this CPU")
@pytest.mark.parametrize("backend", _OTHERS or ["none"])
@pytest.mark.parametrize("loss", train_digits.LOSSES)
def test_backend_reaches_reference_recall(loss, backend):
    ours, reference = _train(loss, backend), _train(loss, "reference")
    assert abs(ours["recall_at_1"] - reference["recall_at_1"]) <= NOISE, (ours, reference)
    assert ours["last_epoch_loss"] < ours["first_epoch_loss"], ours
