"""The benchmark harness (python -m flashkd.bench, the main job) end to end on
a small case: it measures, writes its JSON, and its exit status tells a failed
flashkd measurement from a case skipped by design."""
import json

from flashkd.bench.__main__ import main


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
