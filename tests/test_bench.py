"""The benchmark harness (python -m flashkd.bench, the main job) end to end on
a small case: it measures, writes its JSON, and its exit status tells a failed
flashkd measurement from a case skipped by design; and the warm-up of providers
that prepare each input set."""
import json

import torch

from flashkd.bench import measure as M
from flashkd.bench.__main__ import main
from flashkd.bench.cases import Case, Provider
from flashkd.bench.ops import quant


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
    record, _ = M.measure(case, "prepared", device, sets, repeats=2 * len(sets))
    assert record["status"] == "ok" and len(sets) > 1
    assert set(first_call_timed) == {id(s.tensors["weight"]) for s in sets}
    assert not any(first_call_timed.values()), "an input set was first used inside a timed call"
