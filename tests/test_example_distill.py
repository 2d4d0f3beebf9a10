"""examples/distill_lm.py at tiny size: the fused and plain-torch students follow
the same loss curve, and distillation makes progress."""
import importlib.util
import json
import pathlib
import sys

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "distill_lm.py"
TOL = 1e-3  # absolute, on losses around 3; observed differences are ~1e-6


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("distill_lm_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("divergence", ["fkl", "jsd"])
def test_tiny_curves_agree(example, tmp_path, capsys, divergence):
    out = tmp_path / "result.json"
    plot = tmp_path / "curves.png"
    rc = example.main(["--size", "tiny", "--steps", "25", "--teacher-steps", "30", "--seed", "3",
                       "--divergence", divergence, "--tol", str(TOL), "--json", str(out), "--plot", str(plot),
                       "--device", "cpu", "--quiet"])
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    fused, ref = res["fused"]["losses"], res["reference"]["losses"]
    assert rc == 0 and res["ok"], printed
    assert len(fused) == len(ref) == 25
    assert max(abs(a - b) for a, b in zip(fused, ref)) <= TOL
    assert abs(fused[0] - ref[0]) <= 1e-5  # same parameters at step 0: only rounding differs
    # the student learns: late losses clearly below the first ones
    assert sum(fused[-5:]) / 5 < sum(fused[:3]) / 3 - 0.05, fused
    assert "max |fused - reference|" in printed
    if res["plot"]:  # matplotlib present
        assert plot.stat().st_size > 0


def test_bad_tolerance_fails(example, tmp_path):
    """The exit status reflects the comparison (a negative tolerance cannot be met)."""
    rc = example.main(["--size", "tiny", "--steps", "3", "--teacher-steps", "2", "--tol", "-1", "--plot", "",
                       "--device", "cpu", "--quiet"])
    assert rc == 1


def test_data_is_deterministic(example):
    chain = example.SkipBigramChain(64, seed=1)
    a = chain.sample(8, 20, seed=2)
    b = example.SkipBigramChain(64, seed=1).sample(8, 20, seed=2)
    assert (a == b).all() and a.min() >= 0 and a.max() < 64
    assert 0 < chain.entropy_rate(a) < 4.2  # below log(64): the chain is predictable
