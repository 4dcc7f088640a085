"""The command line: `metric-kernels parity` compares every usable backend with PML and exits 0 only when all agree."""
import metric_kernels.cli as cli


def test_parity_report_passes_and_prints_every_loss(capsys):
    assert cli.main(["parity", "--sizes", "12"]) == 0
    out = capsys.readouterr().out
    for loss in cli.PARITY_LOSSES:
        for backend in ("reference", "cpu", "cuda-emulated"):
            assert f"| {backend} | {loss} | 12 |" in out
    assert "all equal" in out and "FAIL" not in out


def test_parity_report_fails_when_a_backend_differs(monkeypatch, capsys):
    import metric_kernels.reference as reference
    original = reference.supcon_rows
    monkeypatch.setattr(reference, "supcon_rows", lambda *a, **k: original(*a, **k) * (1 + 1e-6))
    assert cli.main(["parity", "--sizes", "12"]) == 1
    assert "FAIL" in capsys.readouterr().out


def _table(out):
    lines = [line for line in out.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_parity_report_names_every_column_and_says_why_rows_differ(capsys):
    assert cli.main(["parity", "--sizes", "12", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    header, rule, *rows = _table(out)
    assert all(header) and len(header) == len(rule) == len(cli.PARITY_COLUMNS)
    assert header == list(cli.PARITY_COLUMNS) and {"classes", "seed", "result"} <= set(header)
    assert rows and all(len(row) == len(header) for row in rows)
    assert "Each row draws its own inputs from its seed (--seed 5" in out  # the caption under the title
    column = {name: i for i, name in enumerate(header)}
    # Rows of one loss and shape differ in seed or classes: no two rows of a backend share both.
    keys = [tuple(row[column[c]] for c in ("backend", "loss", "N", "D", "classes", "seed")) for row in rows]
    assert len(keys) == len(set(keys))
    assert min(int(row[column["seed"]]) for row in rows) == 5
    # The same seed gives every backend the same inputs: the values agree across backends.
    values = {}
    for row in rows:
        case = tuple(row[column[c]] for c in ("loss", "N", "M (refs or proxies)", "D", "classes", "seed"))
        values.setdefault(case, set()).add(float(row[column["loss value"]]))
    assert all(max(v) - min(v) <= 1e-5 * max(abs(x) for x in v) for v in values.values())
