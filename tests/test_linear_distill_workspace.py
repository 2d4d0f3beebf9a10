"""Memory of flashkd.linear_distill_loss: the workspace of one op call beyond what it
returns stays within chunk_budget_bytes plus a small constant, whatever the vocabulary."""
import pytest
import torch

import memory
from linear_distill_cases import make_inputs, op_args


@pytest.mark.parametrize("teacher", ["weights", "logits_fp64"])
@pytest.mark.parametrize("V", [4000, 32000])
def test_workspace_forward(V, teacher, device):
    """One op call (forward computes the gradients): beyond what it returns, at most
    chunk_budget_bytes (student + computed teacher logits of a chunk, or float64 teacher
    logits converted per chunk) + a small constant, for V = 4000 and 8x that."""
    budget = 256 << 10
    N = 64
    inp = make_inputs(device, lead=(N,), V=V, Vt=V + 7, Ds=32, Dt=24, ignore=0.1,
                      teacher="weights" if teacher == "weights" else "logits",
                      tdtype=torch.float64 if teacher == "logits_fp64" else None)
    args = op_args(inp, divergence="jsd", grad_mask=3, budget=budget)
    torch.ops.flashkd.linear_loss(*args)  # warm-up: one-time allocations (cuBLAS workspace) are not workspace
    m = memory.measure(lambda: torch.ops.flashkd.linear_loss(*args), device)
    workspace = m.peak - memory.nbytes(m.result)
    assert workspace <= budget + memory.glue_allowance(N), \
        f"V={V} teacher={teacher}: workspace {workspace} B > budget {budget} B + {memory.glue_allowance(N)} B"
