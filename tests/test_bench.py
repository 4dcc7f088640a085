"""The benchmark (metric_kernels.bench, `metric-kernels bench`): option handling, a tiny real run that writes the
table, results.csv, results.json and the plots, the OOM path, and the max-batch search."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import metric_kernels.cli as cli
from metric_kernels.bench import providers as P
from metric_kernels.bench import report, runner
from metric_kernels.bench.cli import parse_bytes

REQUIRED_COLUMNS = ["kernel", "provider", "mode", "metric", "unit", "x", "value_p50", "value_p20", "value_p80",
                    "device", "torch_version", "triton_version", "timestamp"]
FAST = ["--no-progress", "--reps", "2", "--min-time", "0.01", "--warmup", "1"]


def _bench(*args):
    return cli.main(["bench", *args])


@pytest.mark.parametrize("args, message", [
    (["--sizes", "0"], "--sizes"),
    (["--sizes", "ten"], "--sizes"),
    (["--dims", "-4"], "--dims"),
    (["--losses", "fastap"], "unknown value 'fastap'"),
    (["--providers", "tensorflow"], "unknown value 'tensorflow'"),
    (["--providers", "triton", "--device", "cpu"], "'triton' cannot run on cpu"),
    (["--dtypes", "int8"], "--dtypes"),
    (["--modes", "sideways"], "--modes"),
    (["--max-batch", "2XB"], "not a memory size"),
    (["--max-batch", "0"], "--max-batch"),
    (["--sizes", "16", "32", "--refs", "8", "8", "8"], "one per N"),
    (["--quick", "--full"], "not allowed with"),
    (["--device", "tpu"], "--device"),
    (["--isolation", "thread"], "--isolation"),
])
def test_bad_options_give_a_clear_error(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        _bench(*args, "--out", str(tmp_path))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.csv").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        _bench("--device", "cuda")
    assert "no CUDA device" in capsys.readouterr().err


def test_parse_bytes():
    assert parse_bytes("2GiB") == 2 << 30
    assert parse_bytes("512 MiB") == 512 << 20
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes("1e6") == 1_000_000


def test_presets_and_defaults():
    parser = __import__("argparse").ArgumentParser()
    from metric_kernels.bench import cli as bench_cli
    bench_cli.add_arguments(parser)
    quick = bench_cli.config_from_args(parser.parse_args(["--quick", "--device", "cpu"]), parser)
    assert quick.losses == P.LOSSES and quick.modes == P.MODES and quick.preset == "quick"
    assert "reference" in quick.providers and "compile" in quick.providers and "triton" not in quick.providers
    assert set(P.default_providers("cpu")) == set(quick.providers)
    explicit = bench_cli.config_from_args(parser.parse_args(["--quick", "--sizes", "64", "--losses", "batch_hard_triplet"]),
                                          parser)
    assert explicit.sizes == (64,) and explicit.losses == ("batch_hard",)


def test_flop_counts():
    assert P.flops("circle", "full", 10, 20, 3) == 8 * 10 * 20 * 3
    assert P.flops("proxy_anchor", "forward", 10, 20, 3) == 2 * 10 * 20 * 3
    assert P.flops("batch_hard", "full", 10, 20, 3) == 2 * 10 * 20 * 3
    assert P.flops("batch_hard", "backward", 10, 20, 3) == 0


def _read_csv(path):
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], [dict(zip(rows[0], row)) for row in rows[1:]]


def test_tiny_real_run_writes_table_csv_json_and_plots(tmp_path, capsys):
    providers = ["reference"] + (["pml"] if P.unavailable_reason("pml", "cpu") is None else [])
    assert _bench("--sizes", "24", "--dims", "8", "--providers", *providers, "--out", str(tmp_path), *FAST) == 0
    out = capsys.readouterr().out
    assert "| loss | N | M | provider | forward ms | backward ms | full ms |" in out
    for loss in P.LOSSES:
        for provider in providers:
            assert f"| {loss} | 24 | 24 | {provider} |" in out

    header, rows = _read_csv(tmp_path / "results.csv")
    assert header[:len(REQUIRED_COLUMNS)] == REQUIRED_COLUMNS
    figures = {(r["kernel"], r["provider"], r["mode"], r["metric"]) for r in rows}
    for loss in P.LOSSES:
        for provider in providers:
            for mode in P.MODES:
                assert (loss, provider, mode, "time") in figures
                assert (loss, provider, mode, "peak_memory") in figures
            assert (loss, provider, "full", "tflops") in figures
            assert (loss, provider, "full", "matmul_fraction") in figures
            assert (loss, provider, "full", "max_rel_error") in figures
    assert ("matmul", "torch", "forward", "tflops") in figures
    times = [r for r in rows if r["metric"] == "time" and r["kernel"] != "matmul"]
    assert all(r["status"] == "ok" and float(r["value_p20"]) <= float(r["value_p50"]) <= float(r["value_p80"])
               for r in times)
    errors = [float(r["value_p50"]) for r in rows if r["metric"] == "max_rel_error" and r["provider"] == "reference"]
    assert errors and max(errors) < 1e-4  # float32 against float64
    assert all(r["device"].startswith("cpu") and r["torch_version"] == torch.__version__ and r["timestamp"]
               for r in rows)

    document = json.loads((tmp_path / "results.json").read_text())
    meta = document["meta"]
    assert meta["command"].startswith("metric-kernels bench --sizes 24")
    assert meta["device_name"].startswith("cpu") and meta["date"] and meta["isolation"] == "subprocess"
    assert len(document["records"]) == len(rows)
    for name in ("time.png", "memory.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "results.md").read_text().strip() in out


def _raise_oom(loss):
    def fn(inputs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB (a fake provider)")
    return fn


@pytest.fixture
def fake_providers():
    names = []

    def add(name, make):
        P.register(P.Provider(name, make, "a fake provider for the tests"))
        names.append(name)
    yield add
    for name in names:
        P.unregister(name)


def test_an_out_of_memory_provider_is_recorded_and_the_run_goes_on(tmp_path, fake_providers, capsys):
    fake_providers("fake_oom", _raise_oom)
    assert _bench("--sizes", "16", "32", "--dims", "8", "--losses", "circle", "batch_hard",
                  "--providers", "fake_oom", "reference", "--isolation", "inprocess", "--out", str(tmp_path),
                  *FAST) == 0
    out = capsys.readouterr().out
    assert "| circle | 16 | 16 | fake_oom | OOM | OOM | OOM | OOM |" in out
    assert "| batch_hard | 32 | 32 | reference |" in out and "| batch_hard | 32 | 32 | reference | OOM" not in out
    _, rows = _read_csv(tmp_path / "results.csv")
    fake = [r for r in rows if r["provider"] == "fake_oom"]
    assert fake and all(r["status"] == "oom" and r["value_p50"] == "" for r in fake)
    assert {r["x"] for r in fake} == {"16", "32"}
    assert "out of memory" in fake[0]["note"]
    reference = [r for r in rows if r["provider"] == "reference" and r["metric"] == "time"]
    assert len(reference) == 2 * 2 * 3 and all(r["status"] == "ok" for r in reference)


def test_a_case_that_exceeds_the_memory_limit_in_its_process_is_recorded_as_oom(tmp_path):
    """The subprocess path: the child's address space is capped (--mem-limit), so a case too large fails there."""
    config = runner.Config(losses=("supcon",), providers=("reference",), sizes=(3000,), dims=(4,), modes=("full",),
                           out=str(tmp_path), mem_limit=16 << 20, progress=False, plots=False, matmul=False,
                           timing=dict(min_time=0.01, min_reps=1, max_reps=2, warmup=1))
    outcome = runner.run(config)
    assert [r["status"] for r in outcome["results"]] == ["oom"], outcome["results"]
    assert "OOM" in outcome["table"]


def _allocates_n_squared(loss):
    def fn(inputs):
        n = inputs.x.shape[0]
        block = torch.ones(n, n, dtype=torch.float32)  # N^2 * 4 bytes, touched
        return (inputs.x.sum() + block[0, 0]) * 0 + inputs.x.sum()
    return fn


def test_max_batch_search_finds_the_largest_n_within_the_budget(tmp_path, fake_providers):
    fake_providers("fake_quadratic", _allocates_n_squared)
    fake_providers("fake_oom", _raise_oom)
    # N^2 * 4 bytes fits up to N = 4096. In-process RSS can undercount blocks the allocator reuses, but those past
    # 32 MiB, where the answer is decided, are always fresh mappings.
    budget = 64 << 20
    config = runner.Config(losses=("circle",), providers=("fake_quadratic", "fake_oom"), sizes=(8,), dims=(4,),
                           modes=("full",), out=str(tmp_path), max_batch=budget, max_batch_start=256,
                           isolation="inprocess", progress=False, plots=True, matmul=False, measure_error=False,
                           timing=dict(min_time=0.01, min_reps=1, max_reps=2, warmup=1))
    outcome = runner.run(config)
    found = {r["provider"]: r for r in outcome["records"] if r["metric"] == "max_batch"}
    assert 3500 <= found["fake_quadratic"]["value_p50"] <= 4096, found
    assert found["fake_oom"]["value_p50"] == 0
    assert "Largest N within 64 MiB" in outcome["table"]
    assert os.path.exists(tmp_path / "max_batch.png")


def test_max_batch_in_fresh_processes_and_the_ratio_to_pml(tmp_path):
    if P.unavailable_reason("pml", "cpu") is not None:
        pytest.skip("pytorch-metric-learning is not installed")
    config = runner.Config(losses=("supcon",), providers=("reference", "pml"), sizes=(8,), dims=(4,),
                           modes=("full",), out=str(tmp_path), max_batch=2 << 20, max_batch_start=256,
                           max_batch_cap=1024, progress=False, plots=False, matmul=False, measure_error=False,
                           timing=dict(min_time=0.01, min_reps=1, max_reps=2, warmup=1))
    outcome = runner.run(config)
    found = {r["provider"]: r for r in outcome["records"] if r["metric"] == "max_batch"}
    assert 32 <= found["reference"]["value_p50"] < 1024 and 32 <= found["pml"]["value_p50"] < 1024, found
    ratios = {r["provider"]: r["value_p50"] for r in outcome["records"] if r["metric"] == "max_batch_vs_pml"}
    assert ratios["pml"] == 1.0
    assert ratios["reference"] == pytest.approx(found["reference"]["value_p50"] / found["pml"]["value_p50"])


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "metric_kernels.bench", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--max-batch" in done.stdout and "--quick" in done.stdout


def test_markdown_marks_failures():
    common = {"device": "cpu", "torch_version": "t", "triton_version": ""}
    spec = dict(loss="circle", provider="p", n=4, m=4, dim=2, dtype="float32", modes=["full"])
    rows = report.case_records(spec, {"status": "timeout", "note": "slow", "times": {}, "memory": {}, "errors": {}},
                               None, common, "now")
    assert "| circle | 4 | 4 | p | timeout | timeout |" in report.markdown(rows, {})


def test_cross_batch_memory_benchmark_writes_every_provider(tmp_path):
    """bench/xbm: one CrossBatchMemory step per (loss, provider) in a fresh process, written as CSV and markdown."""
    from metric_kernels.bench import xbm
    assert xbm.main(["--memory-size", "512", "--batch", "32", "--dim", "8", "--losses", "circle",
                     "--providers", "cpu", "pml", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "xbm.md").read_text()
    assert "| circle | cpu | 512 | 32 |" in table and "| circle | pml | 512 | 32 |" in table
    rows = (tmp_path / "xbm.csv").read_text().splitlines()
    assert rows[0].startswith("kernel,provider,mode,metric,unit,x,value_p50")
    assert sum(row.startswith("xbm_circle,") for row in rows[1:]) == 4  # peak memory and time, two providers


def test_readme_results_are_generated_from_committed_bench_outputs():
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "bench" / "update_readme.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _plot_records(sizes, providers, oom=()):
    """Records of fake cases: every loss x provider x N, times rising with N; (provider, N) in oom ran out of memory."""
    common = {"device": "cpu", "torch_version": "t", "triton_version": ""}
    rows = []
    for loss in P.LOSSES:
        for k, provider in enumerate(providers):
            for n in sizes:
                spec = dict(loss=loss, provider=provider, n=n, m=n, dim=8, dtype="float32", modes=list(P.MODES))
                if (provider, n) in oom:
                    result = {"status": "oom", "note": "out of memory", "times": {}, "memory": {}, "errors": {}}
                else:
                    times = {mode: [n * (k + 1) * f for f in (0.9, 1.0, 1.1)] for mode in P.MODES}
                    result = {"status": "ok", "times": times, "memory": {mode: n * 1024.0 for mode in P.MODES},
                              "errors": {}}
                rows += report.case_records(spec, result, None, common, "now")
    return rows


def _time_figure(records):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure = report._panel_figure(plt, report._cases(records), list(P.MODES), "time", "time per call (ms)")
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    panels = [ax for ax in figure.axes]
    plt.close(figure)
    return legend, panels


def test_time_plot_labels_every_panel_and_shows_oom_only_when_something_ran_out_of_memory():
    providers = [f"p{i}" for i in range(12)]
    legend, panels = _time_figure(_plot_records((64, 128), providers))
    assert len(panels) == len(P.LOSSES)
    assert all(ax.get_ylabel() == "time per call (ms)" and ax.get_xlabel() for ax in panels)
    assert report.OOM_LABEL not in legend
    assert legend == sorted(providers) + list(P.MODES)
    for ax in panels:
        # Two x points: no p20..p80 bands, every line has markers, providers keep apart by marker as well as colour.
        assert not ax.collections
        lines = [line for line in ax.get_lines() if len(line.get_xdata()) == 2]
        assert len(lines) == len(providers) * len(P.MODES)
        assert all(line.get_marker() not in (None, "", "None") for line in lines)
        assert len({line.get_marker() for line in lines}) >= 8

    legend, panels = _time_figure(_plot_records((64, 128, 256), ["a", "b"], oom={("b", 256)}))
    assert legend[-1] == report.OOM_LABEL
    # Three points: one band per provider that has them all (the main mode only); b ran out of memory at 256.
    assert all(len(ax.collections) == 1 for ax in panels)


def test_memory_plot_has_one_mode_and_no_mode_entries(tmp_path):
    records = _plot_records((64, 128, 256), ["a", "b"])
    paths = report.write_plots(records, str(tmp_path))
    assert set(paths) == {"time_png", "memory_png"}
    import matplotlib.pyplot as plt
    figure = report._panel_figure(plt, report._cases(records), ["full"], "peak_memory", "peak MiB")
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["a", "b"]
    assert all(ax.get_ylabel() == "peak MiB" for ax in figure.axes)
    plt.close(figure)
