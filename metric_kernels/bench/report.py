"""The benchmark's outputs: records (one per figure), results.csv, results.json, the markdown table, PNG plots."""
from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from typing import Dict, List, Optional

from . import measure
from . import providers as P

COLUMNS = ["kernel", "provider", "mode", "metric", "unit", "x", "value_p50", "value_p20", "value_p80", "device",
           "torch_version", "triton_version", "timestamp",
           # extra columns: the rest of a case's shape, and what happened
           "refs", "dim", "dtype", "status", "note"]
MiB = float(1 << 20)
FAILED = ("oom", "error", "timeout", "skipped")


def _record(common, timestamp, **fields) -> dict:
    row = {column: None for column in COLUMNS}
    row.update(common)
    row["timestamp"] = timestamp
    row.update(fields)
    return row


def _finite(value) -> Optional[float]:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def matmul_records(shape, times_ms: List[float], common: dict, timestamp: str) -> List[dict]:
    dtype, n, m, d = shape
    p50, p20, p80 = (measure.percentile(times_ms, q) for q in (50, 20, 80))
    rate = 2.0 * n * m * d / 1e12
    base = dict(kernel="matmul", provider="torch", mode="forward", x=n, refs=m, dim=d, dtype=dtype, status="ok",
                note="X @ Y^T, the device's matmul rate at this shape")
    return [_record(common, timestamp, metric="time", unit="ms", value_p50=p50, value_p20=p20, value_p80=p80,
                    **base),
            _record(common, timestamp, metric="tflops", unit="TFLOP/s", value_p50=rate / (p50 * 1e-3),
                    value_p20=rate / (p80 * 1e-3), value_p80=rate / (p20 * 1e-3), **base)]


def case_records(spec: dict, result: dict, matmul_ms: Optional[List[float]], common: dict,
                 timestamp: str) -> List[dict]:
    loss, n, m, d = spec["loss"], spec["n"], spec["m"], spec["dim"]
    status, note = result["status"], result.get("note", "")
    base = dict(kernel=loss, provider=spec["provider"], x=n, refs=m, dim=d, dtype=spec["dtype"], status=status,
                note=note)
    rows = []
    if status != "ok":
        for mode in spec["modes"]:
            rows.append(_record(common, timestamp, mode=mode, metric="time", unit="ms", **base))
            rows.append(_record(common, timestamp, mode=mode, metric="peak_memory", unit="MiB", **base))
        return rows
    matmul_rate = None
    if matmul_ms:
        matmul_rate = 2.0 * n * m * d / (measure.percentile(matmul_ms, 50) * 1e-3) / 1e12
    for mode in spec["modes"]:
        times = result["times"].get(mode)
        if times:
            p50, p20, p80 = (measure.percentile(times, q) for q in (50, 20, 80))
            rows.append(_record(common, timestamp, mode=mode, metric="time", unit="ms", value_p50=p50,
                                value_p20=p20, value_p80=p80, **base))
            work = P.flops(loss, mode, n, m, d) / 1e12
            if work > 0:
                tflops = [work / (t * 1e-3) if t > 0 else None for t in (p50, p80, p20)]
                rows.append(_record(common, timestamp, mode=mode, metric="tflops", unit="TFLOP/s",
                                    value_p50=tflops[0], value_p20=tflops[1], value_p80=tflops[2], **base))
                if matmul_rate and tflops[0] is not None:
                    rows.append(_record(common, timestamp, mode=mode, metric="matmul_fraction", unit="fraction",
                                        value_p50=tflops[0] / matmul_rate,
                                        value_p20=(tflops[1] or 0) / matmul_rate,
                                        value_p80=(tflops[2] or 0) / matmul_rate, **base))
        memory = _finite(result["memory"].get(mode))
        if memory is not None:
            rows.append(_record(common, timestamp, mode=mode, metric="peak_memory", unit="MiB",
                                value_p50=memory / MiB, **base))
        error = _finite(result["errors"].get(mode))
        if error is not None:
            rows.append(_record(common, timestamp, mode=mode, metric="max_rel_error", unit="relative",
                                value_p50=error, **base))
    return rows


def max_batch_records(found: Dict[tuple, dict], budget: int, common: dict, timestamp: str) -> List[dict]:
    rows = []
    for (loss, provider), r in found.items():
        base = dict(kernel=loss, provider=provider, mode="full", x=budget / MiB, refs=r["m"], dim=r["dim"],
                    dtype=r["dtype"])
        rows.append(_record(common, timestamp, metric="max_batch", unit="rows", value_p50=r["max_n"],
                            status=r["status"], note=r["note"] or f"budget {budget / MiB:g} MiB", **base))
        theirs = found.get((loss, "pml"))
        if theirs is not None and theirs["max_n"] > 0:
            rows.append(_record(common, timestamp, metric="max_batch_vs_pml", unit="ratio",
                                value_p50=r["max_n"] / theirs["max_n"], status=r["status"],
                                note="largest N within the budget, over PML's", **base))
    return rows


# ------------------------------------------------------------------------------------------------------- files
def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value


def write_csv(records: List[dict], path: str) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for row in records:
            writer.writerow([_csv_value(row.get(column)) for column in COLUMNS])


def _json_safe(value):
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(records: List[dict], meta: dict, path: str, cases: Optional[List[dict]] = None) -> None:
    document = {"meta": meta, "columns": COLUMNS, "records": records}
    if cases is not None:
        document["cases"] = cases
    with open(path, "w") as handle:
        json.dump(_json_safe(document), handle, indent=1)
        handle.write("\n")


def write_all(records: List[dict], meta: dict, out: str, *, plots: bool = True,
              cases: Optional[List[dict]] = None) -> Dict[str, str]:
    os.makedirs(out, exist_ok=True)
    paths = {"csv": os.path.join(out, "results.csv"), "json": os.path.join(out, "results.json")}
    write_csv(records, paths["csv"])
    write_json(records, meta, paths["json"], cases)
    if plots:
        paths.update(write_plots(records, out))
    return paths


# ---------------------------------------------------------------------------------------------------- markdown
def _num(value) -> str:
    if value is None:
        return "–"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _main_mode(modes) -> str:
    for mode in ("full", "backward", "forward"):
        if mode in modes:
            return mode
    return modes[0]


def _cases(records):
    """(dtype, dim) -> ordered {(loss, n, m, provider): {(mode, metric): record}}."""
    groups = defaultdict(dict)
    for row in records:
        if row["kernel"] not in P.LOSSES or row["metric"] in ("max_batch", "max_batch_vs_pml"):
            continue
        key = (row["kernel"], row["x"], row["refs"], row["provider"])
        groups[(row["dtype"], row["dim"])].setdefault(key, {})[(row["mode"], row["metric"])] = row
    return groups


def markdown(records: List[dict], meta: dict) -> str:
    lines = [f"# metric_kernels benchmark: {meta.get('device_name', meta.get('device'))}, {meta.get('date', '')}",
             "",
             f"torch {meta.get('torch_version')}, triton {meta.get('triton_version') or '-'}, "
             f"pytorch-metric-learning {meta.get('pml_version') or '-'}; `{meta.get('command', '')}`",
             "",
             "Times are medians in ms (p20/p80 in results.csv); peak memory is above the inputs; TFLOP/s counts "
             "8NMD (10NMD for the two forward sweeps of NT-Xent and the triplet margin loss, 32NMD for the angular loss's "
             "about 4N pair queries, 2NMD for batch-hard) for a "
             "forward + backward, and "
             "`of matmul` compares it with "
             "X @ Y^T of the same shape on the same device; max rel. error is against the float64 reference "
             "(value and gradients).", ""]
    modes = [m for m in P.MODES if any(r["mode"] == m for r in records if r["kernel"] in P.LOSSES)] or ["full"]
    main = _main_mode(modes)
    for (dtype, dim), cases in _cases(records).items():
        lines += [f"## {dtype}, D = {dim}", ""]
        header = ["loss", "N", "M", "provider"] + [f"{mode} ms" for mode in modes] + \
            [f"peak MiB ({main})", f"TFLOP/s ({main})", "of matmul", "max rel. error"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] * 4 + ["---:"] * (len(header) - 4)) + "|")
        for (loss, n, m, provider), figures in cases.items():
            any_row = next(iter(figures.values()))
            status = any_row["status"]
            cells = [loss, str(n), str(m), provider]
            if status in FAILED:
                label = {"oom": "OOM"}.get(status, status)
                cells += [label] * len(modes) + [label, "", "", ""]
                if status != "oom" and any_row.get("note"):
                    cells[-1] = any_row["note"][:60].replace("|", "/")
            else:
                def value(mode, metric):
                    row = figures.get((mode, metric))
                    return None if row is None else row["value_p50"]
                cells += [_num(value(mode, "time")) for mode in modes]
                cells.append(_num(value(main, "peak_memory")))
                cells.append(_num(value(main, "tflops")))
                fraction = value(main, "matmul_fraction")
                cells.append("–" if fraction is None else f"{100 * fraction:.2g}%")
                error = value(main, "max_rel_error")
                cells.append("–" if error is None else f"{error:.1e}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    matmul = [r for r in records if r["kernel"] == "matmul" and r["metric"] == "tflops"]
    if matmul:
        lines += ["## matmul X @ Y^T (the baseline)", "", "| dtype | N | M | D | ms | TFLOP/s |",
                  "|---|---:|---:|---:|---:|---:|"]
        times = {(r["dtype"], r["x"], r["refs"], r["dim"]): r["value_p50"] for r in records
                 if r["kernel"] == "matmul" and r["metric"] == "time"}
        for r in matmul:
            key = (r["dtype"], r["x"], r["refs"], r["dim"])
            lines.append(f"| {r['dtype']} | {r['x']} | {r['refs']} | {r['dim']} | {_num(times.get(key))} | "
                         f"{_num(r['value_p50'])} |")
        lines.append("")
    found = [r for r in records if r["metric"] == "max_batch"]
    if found:
        ratios = {(r["kernel"], r["provider"]): r["value_p50"] for r in records if r["metric"] == "max_batch_vs_pml"}
        budget = found[0]["x"]
        lines += [f"## Largest N within {budget:g} MiB (forward + backward, {found[0]['dtype']}, D = "
                  f"{found[0]['dim']}, M = {found[0]['refs'] or 'N'})", "",
                  "| loss | provider | max N | vs PML | |", "|---|---|---:|---:|---|"]
        for r in found:
            ratio = ratios.get((r["kernel"], r["provider"]))
            flag = "" if r["status"] == "ok" else r["note"]
            lines.append(f"| {r['kernel']} | {r['provider']} | {int(r['value_p50'])} | "
                         f"{'–' if ratio is None else f'{ratio:.2f}x'} | {flag} |")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- plots
def write_plots(records: List[dict], out: str) -> Dict[str, str]:
    """time.png and memory.png (log-log against N, one panel per loss, one row per dtype and D), max_batch.png."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import warnings
        warnings.warn("matplotlib is not installed: no plots (pip install matplotlib)")
        return {}
    groups = _cases(records)
    paths = {}
    if groups:
        modes = [m for m in P.MODES if any(r["mode"] == m for r in records if r["kernel"] in P.LOSSES)]
        main = _main_mode(modes)
        paths["time_png"] = _panel_plot(plt, groups, modes, "time", "time per call (ms)", os.path.join(out, "time.png"))
        paths["memory_png"] = _panel_plot(plt, groups, [main], "peak_memory", "peak memory above inputs (MiB)",
                                          os.path.join(out, "memory.png"))
    found = [r for r in records if r["metric"] == "max_batch"]
    if found:
        paths["max_batch_png"] = _max_batch_plot(plt, found, os.path.join(out, "max_batch.png"))
    return paths


_STYLES = {"full": "-", "forward": "--", "backward": ":"}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
BAND_MIN_POINTS = 3  # a p20..p80 band over fewer x points hides the lines more than it shows
OOM_LABEL = "out of memory at N"


def _panel_plot(plt, groups, modes, metric, ylabel, path) -> str:
    figure = _panel_figure(plt, groups, modes, metric, ylabel)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _panel_figure(plt, groups, modes, metric, ylabel):
    """One panel per loss (columns) and per dtype and D (rows); each provider one colour and one marker, each mode one
    line style. Every panel has its own y-label; a p20..p80 band only on the main mode's lines with at least
    BAND_MIN_POINTS points; the out-of-memory marker appears in the legend only when some case ran out of memory."""
    losses = [loss for loss in P.LOSSES if any(key[0] == loss for cases in groups.values() for key in cases)]
    rows = list(groups)
    figure, axes = plt.subplots(len(rows), len(losses), figsize=(4.4 * len(losses), 3.8 * len(rows)),
                                squeeze=False)
    providers = sorted({key[3] for cases in groups.values() for key in cases})
    palette = plt.get_cmap("tab10" if len(providers) <= 10 else "tab20")
    colours = {p: palette(i % palette.N) for i, p in enumerate(providers)}
    markers = {p: _MARKERS[i % len(_MARKERS)] for i, p in enumerate(providers)}
    main = _main_mode(modes)
    any_failed = False
    for r, group in enumerate(rows):
        cases = groups[group]
        for c, loss in enumerate(losses):
            ax = axes[r][c]
            failed = defaultdict(list)
            for provider in providers:
                for mode in modes:
                    points = []
                    for (case_loss, n, _, case_provider), figures in sorted(cases.items(), key=lambda kv: kv[0][1]):
                        if case_loss != loss or case_provider != provider:
                            continue
                        row = figures.get((mode, metric))
                        if row is None:
                            continue
                        if row["status"] == "oom" and mode == modes[0]:
                            failed[provider].append(n)
                        if row["value_p50"] is not None and row["value_p50"] > 0:
                            points.append((n, row["value_p50"], row["value_p20"], row["value_p80"]))
                    if not points:
                        continue
                    xs = [p[0] for p in points]
                    is_main = mode == main
                    ax.plot(xs, [p[1] for p in points], _STYLES.get(mode, "-"), marker=markers[provider],
                            markersize=5 if is_main else 3.5, linewidth=1.6 if is_main else 1.0,
                            alpha=1.0 if is_main else 0.7, color=colours[provider])
                    if is_main and len(points) >= BAND_MIN_POINTS and \
                            all(p[2] is not None and p[3] is not None for p in points):
                        ax.fill_between(xs, [p[2] for p in points], [p[3] for p in points],
                                        color=colours[provider], alpha=0.12, linewidth=0)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            if failed:
                any_failed = True
                top = ax.get_ylim()[1]
                for provider, ns in failed.items():
                    ax.plot(ns, [top] * len(ns), "x", color=colours[provider], markersize=8, clip_on=False)
            ax.set_title(f"{loss} ({group[0]}, D={group[1]})", fontsize=10)
            ax.set_xlabel("N (batch rows)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=colours[p], marker=markers[p], markersize=5, label=p) for p in providers]
    if len(modes) > 1:
        handles += [Line2D([], [], color="grey", linestyle=_STYLES.get(m, "-"), label=m) for m in modes]
    if any_failed:
        handles.append(Line2D([], [], color="grey", marker="x", linestyle="", label=OOM_LABEL))
    columns = min(len(handles), 8)
    legend_rows = -(-len(handles) // columns)
    legend_inches = 0.3 + 0.22 * legend_rows
    figure.legend(handles=handles, loc="upper center", ncol=columns, fontsize=8, frameon=False,
                  bbox_to_anchor=(0.5, 1.0))
    figure.tight_layout(rect=(0, 0, 1, 1 - legend_inches / figure.get_figheight()))
    return figure


def _max_batch_plot(plt, found, path) -> str:
    losses = [loss for loss in P.LOSSES if any(r["kernel"] == loss for r in found)]
    providers = sorted({r["provider"] for r in found})
    figure, ax = plt.subplots(figsize=(2 + 1.6 * len(losses) * max(len(providers), 1) / 3, 4))
    width = 0.8 / max(len(providers), 1)
    for i, provider in enumerate(providers):
        values = []
        for loss in losses:
            row = next((r for r in found if r["kernel"] == loss and r["provider"] == provider), None)
            values.append(row["value_p50"] if row else 0)
        bars = ax.bar([j + i * width for j in range(len(losses))], values, width, label=provider)
        ax.bar_label(bars, labels=[str(int(v)) if v else "0" for v in values], fontsize=7)
    ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(losses))])
    ax.set_xticklabels(losses)
    ax.set_yscale("log", base=2)
    positive = [r["value_p50"] for r in found if r["value_p50"]]
    if positive:
        ax.set_ylim(bottom=2 ** (math.floor(math.log2(min(positive))) - 1), top=max(positive) * 2)
    ax.set_ylabel("largest N within the budget")
    ax.set_title(f"forward + backward within {found[0]['x']:g} MiB ({found[0]['dtype']}, D={found[0]['dim']})",
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
