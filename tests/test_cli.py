"""The command line: `metric-kernels parity` compares every usable backend with PML and exits 0 only when all agree."""
import metric_kernels.cli as cli


def test_parity_report_passes_and_prints_every_loss(capsys):
    assert cli.main(["parity", "--sizes", "12"]) == 0
    out = capsys.readouterr().out
    for loss in ("circle", "supcon", "batch_hard_triplet", "proxy_anchor"):
        assert f"| reference | {loss} | 12 |" in out
    assert "all equal" in out and "FAIL" not in out


def test_parity_report_fails_when_a_backend_differs(monkeypatch, capsys):
    import metric_kernels.reference as reference
    original = reference.supcon_rows
    monkeypatch.setattr(reference, "supcon_rows", lambda *a, **k: original(*a, **k) * (1 + 1e-6))
    assert cli.main(["parity", "--sizes", "12"]) == 1
    assert "FAIL" in capsys.readouterr().out
