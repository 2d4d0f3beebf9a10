"""The benchmark harness (python -m flashkd.bench, the main job) end to end on
a small case: it measures, writes its JSON, and its exit status tells a failed
flashkd measurement from a case skipped by design; the warm-up of providers
that prepare each input set; and the accuracy record every op reports."""
import importlib.util
import json
import math

import torch

from flashkd.bench import measure as M
from flashkd.bench.__main__ import main
from flashkd.bench.cases import Case, Provider
from flashkd.bench.errors import error_record, max_abs_diff
from flashkd.bench.ops import quant
from flashkd.bench.timing import Budget


def test_quant_run_writes_json_and_plan_skips_are_no_failure(tmp_path, capsys):
    out = tmp_path / "quant.json"
    rc = main(["--device", "cpu", "--ops", "quant_linear:w1.58a8-infer,quant_linear:w8a8",
               "--shapes", "16x64x200:fp32,1x4096x4096:fp32", "--providers", "flashkd",
               "--repeats", "2", "--json", str(out)])
    records = json.loads(out.read_text())["records"]
    status = {(r["variant"], r["shape"]): r["status"] for r in records}
    assert status[("w1.58a8-infer", "16x64x200")] == "ok"
    assert status[("w8a8", "16x64x200")] == "ok"
    # The CPU plan measures only the inference forms at the decode shape.
    assert status[("w8a8", "1x4096x4096")].startswith("skipped: not in the CPU plan")
    assert rc == 0
    assert "quant_linear:w1.58a8-infer" in capsys.readouterr().out


def test_per_input_warmup_prepares_every_set_before_timing(monkeypatch):
    """A provider marked per_input_warmup (a peer that quantizes each input set's
    weights on first use) meets every input set once before the first timed call."""
    timing = {"started": False}
    first_call_timed = {}

    def build(case, device):
        def fn(t):
            first_call_timed.setdefault(id(t["weight"]), timing["started"])
            return t["x"].sum()
        return fn

    real_time_calls = M.time_calls

    def time_calls(*args, **kwargs):
        timing["started"] = True
        return real_time_calls(*args, **kwargs)

    monkeypatch.setitem(quant.PROVIDERS, "prepared", Provider(build, per_input_warmup=True))
    monkeypatch.setattr(M, "time_calls", time_calls)
    case = Case("quant_linear", "w8a8-infer", "4x64x64", "fp32")
    device = torch.device("cpu")
    sets = M.input_sets(case, device, cache_bytes=1 << 20)  # 1 MiB of cache: several sets
    record, _ = M.measure(case, "prepared", device, sets, Budget(reps=2 * len(sets)))
    assert record["status"] == "ok" and len(sets) > 1
    assert set(first_call_timed) == {id(s.tensors["weight"]) for s in sets}
    assert not any(first_call_timed.values()), "an input set was first used inside a timed call"


def test_bare_cpu_run_measures_every_op_once_at_overview_shapes():
    """A bare CPU run (the README's main job) covers every op family, one fp32
    shape each, and leaves the compiling providers out."""
    from flashkd.bench.__main__ import DEFAULT_SKIP
    from flashkd.bench.ops import OPS
    from flashkd.bench.selection import select_cases

    cases = select_cases(None, None, "cpu")
    assert {c.op for c in cases} == set(OPS)
    for name, mod in OPS.items():
        shapes = {c.shape + ":" + c.dtype for c in cases if c.op == name}
        assert shapes == set(mod.SHAPE_SETS["overview"]) and all(s.endswith(":fp32") for s in shapes)
    assert {"torch.compile", "vit_tome:flashkd+compile"} <= set(DEFAULT_SKIP["cpu"].split(","))


def test_a_call_that_ignores_the_variant_is_measured_once(tmp_path):
    """quant's float baseline makes the same call whatever the scheme: the run
    measures it for the first scheme and reuses that record for the others,
    while flashkd is measured per scheme; the default skip names its reason."""
    out = tmp_path / "quant.json"
    rc = main(["--device", "cpu", "--ops",
               "quant_linear:w8a8,quant_linear:w4a16,quant_linear:w8a8-infer,quant_linear:w4a16-infer",
               "--shapes", "16x64x200:fp32", "--providers", "flashkd,torch,torchao",
               "--repeats", "2", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    rows = {(r["variant"], r["provider"]): r for r in data["records"]}
    # torchao's int4 config leaves a weight whose K is not a multiple of its
    # group float (it only logs): a skip with the reason, not a float layer
    # timed as torchao's (the run used to end in its bytes-per-weight count).
    # Without torchao (an optional peer) the skip says that instead.
    reason = "cannot build" if importlib.util.find_spec("torchao") else "not importable"
    assert rows[("w4a16-infer", "torchao")]["status"].startswith("skipped: torchao " + reason)
    first = rows[("w8a8", "torch")]
    assert first["status"] == "ok" and "same_as" not in first
    reused = rows[("w4a16", "torch")]
    assert reused["same_as"] == "quant_linear:w8a8 16x64x200:fp32"
    assert reused["fwd_bwd_ms"] == first["fwd_bwd_ms"]
    # The inference form's baseline is a forward-only call: measured afresh.
    infer = rows[("w8a8-infer", "torch")]
    assert "same_as" not in infer and infer["fwd_bwd_ms"] is None
    assert rows[("w4a16", "flashkd")]["fwd_bwd_ms"] != rows[("w8a8", "flashkd")]["fwd_bwd_ms"]
    assert data["meta"]["budget"] == {"reps": 2, "cpu_seconds": 3.0}


def test_default_skip_says_why_and_seconds_must_be_positive(tmp_path, capsys):
    import pytest

    out = tmp_path / "tome.json"
    assert main(["--device", "cpu", "--ops", "tome_merge:r16", "--shapes", "b2t17c8m4:fp32",
                 "--providers", "torch.compile", "--json", str(out)]) == 0
    (record,) = json.loads(out.read_text())["records"]
    assert record["status"] == "skipped: left out of a CPU run by default (--skip '' runs it)"
    # --also-skip adds to the defaults (gpu_suite: a kernel that failed its tests) and is checked like --skip
    assert main(["--device", "cpu", "--ops", "tome_merge:r16", "--shapes", "b2t17c8m4:fp32",
                 "--providers", "torch.compile,torch", "--also-skip", "tome_merge:torch", "--json", str(out)]) == 0
    status = {r["provider"]: r["status"] for r in json.loads(out.read_text())["records"]}
    assert status == {"torch.compile": "skipped: left out of a CPU run by default (--skip '' runs it)",
                      "torch": "skipped: --also-skip"}
    with pytest.raises(SystemExit, match="names no provider"):
        main(["--device", "cpu", "--also-skip", "tome_merge:nobody"])
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--seconds", "0"])
    assert "--seconds must be positive" in capsys.readouterr().err


def test_a_failing_build_oracle_or_input_set_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    """A provider whose build raises (not Unsupported), an oracle check that
    raises and input sets that cannot be made (out of memory on a GPU) each
    become a record that says why; the other measurements and cases stand."""
    from flashkd.bench import runner
    from flashkd.bench.progress import Progress

    def broken(case, device):
        raise RuntimeError("peer API changed")

    def oracle(case, inputs, outputs):
        raise MemoryError("oracle too large")

    monkeypatch.setitem(quant.PROVIDERS, "broken", Provider(broken))
    monkeypatch.setattr(quant, "errors", oracle)
    out = tmp_path / "quant.json"
    rc = main(["--device", "cpu", "--ops", "quant_linear:w8a8-infer", "--shapes", "16x64x200:fp32",
               "--providers", "flashkd,broken", "--repeats", "2", "--json", str(out)])
    assert rc == 0  # flashkd itself was measured
    rows = {r["provider"]: r for r in json.loads(out.read_text())["records"]}
    assert rows["broken"]["status"] == "failed: RuntimeError: peer API changed"
    assert rows["flashkd"]["status"] == "ok" and rows["flashkd"]["fwd_ms"] > 0
    assert rows["flashkd"]["accuracy"] == "failed: MemoryError: oracle too large"

    def no_inputs(case, device, cache_bytes):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(runner, "input_sets", no_inputs)
    cases = [Case("quant_linear", "w8a8-infer", "16x64x200", "fp32")] * 2
    device = torch.device("meta")  # any device but the CPU makes its input sets in this process
    records = list(runner.run(cases, ["flashkd", "torch"], device, 1e9, 1 << 20, Progress(4)))
    assert [[r["status"] for r in case] for case in records] == [["out of memory"] * 2] * 2


def test_cuda_timing_queues_the_timed_calls_behind_a_gpu_sleep(monkeypatch):
    """The CUDA path of time_calls, with torch.cuda's events, sleep and
    synchronize faked (no GPU needed): one calibration sleep, then one sleep
    queued before the first timed call, as long as queueing the calls takes
    (capped), and a median of the per-call event pairs."""
    from flashkd.bench import timing

    log = []

    class FakeEvent:
        def __init__(self, enable_timing):
            self.t = None

        def record(self):
            self.t = len(log)
            log.append("event")

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 2.0  # ms

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: log.append(("sleep", cycles)))
    monkeypatch.setattr(timing, "_sleep_cycles_per_ms", None)
    calls = []
    result = timing.time_calls(lambda i: calls.append(i), lambda i: None, torch.device("cuda"),
                               timing.Budget(reps=5))
    assert result.median_ms == 2.0 and result.reps == 5
    assert calls == [0, 1, 2] + [0, 1, 2, 3, 4]  # warm-up, then the timed calls
    sleeps = [i for i, entry in enumerate(log) if entry != "event"]
    assert log[sleeps[0]] == ("sleep", 1_000_000)  # calibration: 1e6 cycles in 2 ms
    cycles = log[sleeps[1]][1]
    assert 0 <= cycles <= timing.CUDA_MAX_SLEEP_MS * 5e5
    assert log[sleeps[1] + 1:].count("event") == 10  # every timed event pair comes after it


def test_error_record_reports_the_worst_gradient_and_counts_nan_worst():
    rec = error_record(0.5, -2.0, {"x": (1e-3, 1.0), "weight": (1e-4, 1e-3), "bias": (0.0, 0.0)})
    assert rec["loss_rel_err"] == 0.25  # relative to |oracle|
    assert rec["grad_err"] == 0.1 and rec["grad_max_abs_err"] == 1e-4  # weight: 1e-4 / 1e-3 beats x's 1e-3
    assert rec["grad_err_x"] == 1e-3 and rec["grad_err_bias"] == 0.0  # a zero oracle with no error is 0
    rec = error_record(0.0, 1.0, {"x": (1.0, 1.0), "weight": (float("nan"), 1.0)})
    assert math.isnan(rec["grad_err"]) and math.isnan(rec["grad_max_abs_err"])
    assert set(error_record(0.0, 0.0, {})) == {"loss_rel_err"}  # forward-only; a zero loss divides safely
    assert set(error_record(0.0, 1.0, {"x": (0.0, 1.0)})) == {"loss_rel_err", "grad_err", "grad_max_abs_err"}
    assert math.isnan(max_abs_diff(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0], dtype=torch.float64)))
    assert max_abs_diff(torch.tensor([1.0, 2.5], dtype=torch.bfloat16), torch.tensor([1.0, 2.0])) == 0.5
