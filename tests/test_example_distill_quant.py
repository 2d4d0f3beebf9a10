"""examples/distill_quant.py at tiny size: both students train, and freezing
the ternary student leaves its held-out cross-entropy unchanged."""
import importlib.util
import json
import math
import pathlib
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "distill_quant.py"


def test_tiny_run(tmp_path):
    spec = importlib.util.spec_from_file_location("distill_quant_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        out = tmp_path / "result.json"
        rc = module.main(["--size", "tiny", "--steps", "12", "--teacher-steps", "10", "--plot", "", "--json",
                          str(out), "--quiet"])
    finally:
        sys.modules.pop(spec.name, None)
    res = json.loads(out.read_text())
    assert rc == 0 and len(res["float"]) == len(res["w1.58a8"]) == 12
    assert all(math.isfinite(v) for v in res["float"] + res["w1.58a8"])
    assert abs(res["float"][0] - res["w1.58a8"][0]) < 0.05  # same init; only quantization differs
    ce = res["heldout_ce"]
    assert ce["w1.58a8 frozen"] == ce["w1.58a8"]  # integer path: bit-identical logits before and after freeze
