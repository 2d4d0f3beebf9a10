"""``python -m flashkd.bench``: measure flashkd against torch eager,
torch.compile and peers on the best device present, print a table, and
optionally write JSON and a plot. Exits 1 when a flashkd measurement failed
(skipped cases, e.g. outside a device's plan, are not failures)."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from . import machine, report, timing
from .ops import OPS
from .progress import Progress
from .runner import run
from .selection import select_cases

# What --skip leaves out by default, so that a bare run stays short: on a CPU
# every provider that compiles (torch.compile; cut-cross-entropy's CPU
# implementation and liger's chunked linear JSD are torch.compile'd too), since
# one compile there takes 20-95 s, longer than the rest of the ~1 minute run;
# on a GPU, torch.compile of the fused linear ops, whose compiles would take a
# bare run past its ~3 minutes. On both, the compiled flashkd-merged ViT (one
# more whole-model compile, 70 s on the CPU).
DEFAULT_SKIP = {"cpu": "torch.compile,linear_ce:cce,linear_distill:liger,vit_tome:flashkd+compile",
                "cuda": "linear_ce:torch.compile,linear_distill:torch.compile,vit_tome:flashkd+compile"}
# The overview (a bare CPU run) spends half a second timing each measurement, so
# that the run stays about a minute: a first look, noisier than the 3 s default.
OVERVIEW_SECONDS = 0.5


def _parser():
    p = argparse.ArgumentParser(prog="python -m flashkd.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--ops", help="comma list of op or op:variant, e.g. distill_loss:fkl,distill_loss:jsd "
                                 "(default: each op's default variants for the device)")
    p.add_argument("--shapes", help="comma list of named sets (overview, quick, accept, cpu, gpu, gpu-target) "
                                    "or shapes like 4096x32000:fp32, each op reading its own (default: overview "
                                    "on CPU, gpu-target on CUDA)")
    p.add_argument("--providers", help="comma list (default: all of each op's providers)")
    p.add_argument("--skip", help="comma list of providers or op:provider pairs not to run, shown as skipped "
                                  f"(default: {DEFAULT_SKIP['cpu']} on CPU, {DEFAULT_SKIP['cuda']} on CUDA; "
                                  "--skip '' runs all)")
    p.add_argument("--also-skip", default="", help="comma list like --skip's, left out on top of --skip's entries "
                                                   "or the defaults (bench/gpu_suite.sh: a kernel that failed its "
                                                   "tests)")
    p.add_argument("--repeats", type=int, help="timed calls per measurement (default: adaptive, see timing.py)")
    p.add_argument("--seconds", type=float,
                   help=f"on a CPU, time calls until this many seconds are spent, forward and forward+backward "
                        f"each (default: {OVERVIEW_SECONDS} for the overview, i.e. without --shapes, "
                        f"{timing.CPU_BUDGET_S} otherwise)")
    p.add_argument("--json", metavar="PATH", help="write the records and run metadata as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of forward+backward times (needs matplotlib)")
    p.add_argument("--list", action="store_true", help="list ops, variants, shape sets and providers, then exit")
    return p


def _budget(args, device):
    seconds = args.seconds
    if seconds is None:
        seconds = OVERVIEW_SECONDS if device.type == "cpu" and args.shapes is None else timing.CPU_BUDGET_S
    return timing.Budget(reps=args.repeats, cpu_seconds=seconds)


def _list():
    for name, mod in OPS.items():
        print(f"{name}\n  variants:  {', '.join(mod.VARIANTS)}\n  providers: {', '.join(mod.PROVIDERS)}")
        for set_name, shapes in mod.SHAPE_SETS.items():
            print(f"  shapes {set_name}: {', '.join(shapes)}")


def _skip_reasons(spec, reason):
    """{entry: reason} for --skip's entries, each a provider of some op or an op:provider pair."""
    skip = {item.strip(): reason for item in spec.split(",") if item.strip()}
    for item in skip:
        op, _, provider = item.rpartition(":")
        candidates = [OPS[op]] if op in OPS else [] if op else list(OPS.values())
        if not any(provider in mod.PROVIDERS for mod in candidates):
            raise SystemExit(f"error: --skip {item!r} names no provider (or op:provider); see --list")
    return skip


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.seconds is not None and not args.seconds > 0:
        parser.error("--seconds must be positive")
    if args.list:
        _list()
        return 0
    device = machine.resolve_device(args.device)
    try:
        cases = select_cases(args.ops, args.shapes, device.type)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    known = list(dict.fromkeys(p for name in dict.fromkeys(c.op for c in cases) for p in OPS[name].PROVIDERS))
    providers = args.providers.split(",") if args.providers else known
    unknown = [p for p in providers if p not in known]
    if unknown:
        raise SystemExit(f"error: unknown provider(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if args.skip is not None:
        skip = _skip_reasons(args.skip, "--skip")
    else:
        skip = _skip_reasons(DEFAULT_SKIP[device.type],
                             f"left out of a {device.type.upper()} run by default (--skip '' runs it)")
    skip.update(_skip_reasons(args.also_skip, "--also-skip"))

    bandwidth = machine.copy_bandwidth(device)
    meta = machine.describe(device, bandwidth)
    meta["argv"] = sys.argv[1:] if argv is None else list(argv)
    meta["skip"] = sorted(skip)
    budget = _budget(args, device)
    meta["budget"] = dataclasses.asdict(budget)
    print(report.header(meta), flush=True)
    progress = Progress(sum(len([p for p in providers if p in OPS[c.op].PROVIDERS]) for c in cases))
    records = []
    for case_records in run(cases, providers, device, bandwidth, machine.cache_bytes(device), progress,
                            budget, skip):
        records += case_records
        if args.json:  # after every case, so a run cut short keeps what it measured
            report.write_json(args.json, meta, records)
    progress.close()

    print(report.table(records))
    print("\n" + report.LEGEND)
    if args.json:
        print(f"JSON written to {args.json}")
    if args.plot:
        print(report.write_plot(args.plot, meta, records))
    failed = [r for r in records if r["provider"] == "flashkd" and r["status"] != "ok"
              and not r["status"].startswith("skipped")]  # a case outside the device's plan is no failure
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
