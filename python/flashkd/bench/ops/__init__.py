"""Benchmarked ops, one module each, registered in OPS (``_linear`` holds what
the two fused linear ops share).

An op module defines:

  NAME                 op name used by ``--ops``
  VARIANTS             selectable variants, e.g. the divergences
  DEFAULT_VARIANTS     {device type: variants a bare run measures; none leaves the op out}
  SHAPE_SETS           {set name: shape specs}; every op has the same set names
                       (overview, quick, accept, cpu, gpu, gpu-target) so one --shapes
                       serves all; overview is a bare CPU run's (each op once, fp32,
                       about a minute in all), accept the issues' CPU acceptance shapes
  DEFAULT_SHAPES       {device type: set name a bare run measures}
  parse_shape(spec)    "4096x32000:fp32" -> (shape, dtype) strings; ValueError if malformed
  make_inputs(case, device, seed) -> cases.Inputs   random, never zeros
  accuracy_inputs(inputs, max_elements) -> cases.Inputs   subset the oracle can afford
  floor_bytes(case)    fewest bytes any implementation must move
  FLOOR_PROVIDER       optional: a provider whose measured fwd+bwd time is the floor
                       where it exceeds the bytes' (the linear ops' GEMMs alone)
  PROVIDERS            {provider name: cases.Provider}
  errors(case, inputs, outputs) -> {provider: {"loss_rel_err", "grad_err", "grad_max_abs_err"}}
                       (ops whose output is a tensor put a grad_output in their Inputs
                       and report the output's relative error as loss_rel_err;
                       optionally "bytes_per_weight", shown in the report's B/weight column)

A provider whose result does not require grad is measured forward only (the
quant op's inference variants).
"""
from . import distill, linear_ce, linear_distill, quant, tome, vit

# In the order a run measures them: the open issues' GPU targets first (a GPU
# lease may end a run early; the ToMe ops' issue is closed).
OPS = {mod.NAME: mod for mod in (distill, linear_ce, linear_distill, quant, tome, vit)}
