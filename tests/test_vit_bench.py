"""The tome_merge and vit_tome benchmark ops follow the harness protocol: their
shapes parse, their providers run forward and backward on the op's inputs, and
errors() checks them against the float64 oracle (no timing here)."""
import pytest
import torch

from flashkd.bench.cases import Case
from flashkd.bench.ops import OPS
from flashkd.bench.selection import select_cases


def _run(case, provider, inputs):
    fn = OPS[case.op].PROVIDERS[provider].build(case, torch.device("cpu"))
    out = fn(inputs.tensors)
    inputs.backward(out)
    return out.detach(), inputs.take_grads()


@pytest.mark.parametrize("case, providers", [
    (Case("tome_merge", "r16", "b3t41c24", "fp32"), ("flashkd", "torch")),
    (Case("tome_merge", "r8", "b2t9c16", "fp32"), ("flashkd", "torch")),  # r capped at (9 - 1) // 2 = 4
    (Case("vit_tome", "tiny", "b3r3", "fp32"), ("flashkd", "torch", "unmerged")),
    (Case("vit_tome", "tiny", "b2r2", "fp32"), ("flashkd+compile",)),
])
def test_providers_match_the_oracle(case, providers):
    mod = OPS[case.op]
    inputs = mod.make_inputs(case, torch.device("cpu"), seed=0)
    assert mod.floor_bytes(case) > 0
    outputs = {name: _run(case, name, inputs) for name in providers}
    errors = mod.errors(case, inputs, outputs)
    assert set(errors) == set(providers) - {"unmerged"}
    for name, err in errors.items():
        assert err["loss_rel_err"] < 1e-5 and err["grad_err"] < 1e-5, (name, err)


def test_accuracy_inputs_take_leading_rows():
    for case in (Case("tome_merge", "r16", "b4t41c24", "fp32"), Case("vit_tome", "tiny", "b4r2", "fp32")):
        mod = OPS[case.op]
        inputs = mod.make_inputs(case, torch.device("cpu"), seed=0)
        leaf = inputs.tensors[inputs.grad_names[0]]
        subset = mod.accuracy_inputs(inputs, max_elements=leaf[0].numel() * 2)
        sub_leaf = subset.tensors[inputs.grad_names[0]]
        assert sub_leaf.shape[0] == 2 and sub_leaf.requires_grad and torch.equal(sub_leaf, leaf[:2])
        assert subset.grad_output.shape[0] == 2


def test_shape_sets_parse_and_stay_apart_from_the_linear_ops():
    for name in ("tome_merge", "vit_tome"):
        mod = OPS[name]
        for shapes in mod.SHAPE_SETS.values():
            for spec in shapes:
                mod.parse_shape(spec)
    # A linear op's NxDxV shape is not read as a tome_merge shape, and back.
    ops = "linear_ce,tome_merge:r16,vit_tome:tiny"
    assert {c.op for c in select_cases(ops, "256x256x8192:fp32", "cpu")} == {"linear_ce"}
    assert {c.op for c in select_cases(ops, "b32t197c384:fp32,b8r16:fp32", "cpu")} == {"tome_merge", "vit_tome"}
    with pytest.raises(ValueError, match="tome_merge shape"):
        OPS["tome_merge"].parse_shape("32x197x384:fp32")
