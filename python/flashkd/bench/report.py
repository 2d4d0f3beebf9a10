"""The run's results as a text table (stdout and the suite's markdown), a JSON
file (the record of a run: bench/results/ holds only these), and a PNG.

``python -m flashkd.bench.report RUN.json`` prints a saved run's table again."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .runner import compared_ms

COLUMNS = ("provider", "fwd ms", "fwd+bwd ms", "peak MiB", "work MiB", "loss err", "grad err", "x floor",
           "vs torch", "vs compile", "work/torch", "B/weight")


def case_label(rec, sep=" "):
    return f"{rec['op']}:{rec['variant']}{sep}{rec['shape']}:{rec['dtype']}"


def _ms(v):
    if v is None:  # forward-only provider
        return "-"
    return f"{v:.0f}" if v >= 100 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def _cells(rec):
    if rec["status"] != "ok":
        return [rec["provider"], rec["status"]]

    def opt(key, fmt):
        return fmt(rec[key]) if rec.get(key) is not None else "-"

    return [
        rec["provider"], _ms(rec["fwd_ms"]), _ms(rec["fwd_bwd_ms"]), f"{rec['peak_mb']:.0f}",
        opt("work_mb", "{:.0f}".format),
        opt("loss_rel_err", "{:.1e}".format), opt("grad_err", "{:.1e}".format), opt("x_floor", "{:.2f}".format),
        opt("x_torch", "{:.2f}x".format), opt("x_compile", "{:.2f}x".format), opt("work_vs_torch", "{:.1%}".format),
        opt("bytes_per_weight", "{:.3f}".format),
    ]


def header(meta):
    dirty = "+dirty" if meta.get("dirty") else ""
    return (f"flashkd {meta['flashkd']} @ {meta['commit'][:12]}{dirty} | torch {meta['torch']} | "
            f"{meta['device_name']} ({meta['device']}, isa {meta['cpu_isa']}, {meta['threads']} threads) | "
            f"copy {meta['copy_bandwidth_gbs']:.0f} GB/s | {meta['date']}")


def table(records):
    """One block per case; a provider that did not run shows why instead of numbers."""
    rows, width = [], [len(c) for c in COLUMNS]
    for rec in records:
        cells = _cells(rec)
        if len(cells) == len(COLUMNS):
            width = [max(w, len(c)) for w, c in zip(width, cells, strict=True)]
        else:  # provider and status
            width[0] = max(width[0], len(cells[0]))
        rows.append((rec, cells))

    def line(cells):  # provider name left-aligned, numbers right-aligned
        padded = (c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, width, strict=True)))
        return "  " + "  ".join(padded)

    lines, current = [], None
    for rec, cells in rows:
        if case_label(rec) != current:
            current = case_label(rec)
            lines += ([""] if lines else []) + [current, line(COLUMNS)]
        lines.append(line(cells) if len(cells) == len(COLUMNS) else f"  {cells[0].ljust(width[0])}  {cells[1]}")
    return "\n".join(lines)


LEGEND = (
    "fwd / fwd+bwd ms: median; peak MiB: peak memory of one forward+backward above what was in use before it "
    "(inputs excluded, returned gradients included); work MiB: that peak minus the returned gradients (the "
    "workspace); loss err: |loss - oracle| / |oracle| (ops with a tensor output: max |out - oracle| / max "
    "|oracle|); grad err: max |grad - oracle| / max |oracle grad|, the "
    "worse leaf's (float64 oracle, same inputs); x floor: fwd+bwd time (fwd time where fwd+bwd is '-': an "
    "inference-only case) / floor, floor = the op's fewest bytes "
    "moved / measured copy bandwidth or, for the linear ops, the gemm row's time (the same GEMMs alone, this run) "
    "where larger; vs torch, vs compile: fwd+bwd (or fwd) speedup over that provider; work/torch: workspace as a "
    "share of torch eager's; B/weight: bytes of weight storage per weight, where an op reports it."
)


def write_json(path, meta, records):
    """Rewritten after every case: through a temporary file and a rename, so
    that a run killed mid-write (a time limit) leaves the last whole file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    os.replace(partial, path)


def write_plot(path, meta, records):
    """Forward+backward time per case and provider (log scale). Returns a
    message instead of raising when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot written"
    times = {(case_label(r, "\n"), r["provider"]): compared_ms(r) for r in records if r["status"] == "ok"}
    labels = list(dict.fromkeys(label for label, _ in times))
    providers = list(dict.fromkeys(provider for _, provider in times))
    width = 0.8 / max(1, len(providers))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(labels) * len(providers)), 4.5))
    for j, provider in enumerate(providers):
        shift = (j - (len(providers) - 1) / 2) * width
        xs = [i + shift for i, label in enumerate(labels) if (label, provider) in times]
        ys = [times[label, provider] for label in labels if (label, provider) in times]
        ax.bar(xs, ys, width, label=provider)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("forward+backward ms (median; forward for inference-only cases)")
    ax.set_title(f"{meta['device_name']} | torch {meta['torch']} | flashkd {meta['commit'][:12]}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"


def main(argv=None):
    run = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    print(header(run["meta"]))
    print(table(run["records"]))
    print("\n" + LEGEND)


if __name__ == "__main__":
    main()
