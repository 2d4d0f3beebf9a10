"""Benchmarked ops, one module each, registered in OPS.

A later op (linear cross-entropy, fused linear distillation) plugs in as a new
module defining:

  NAME                 op name used by ``--ops``
  VARIANTS             selectable variants, e.g. the divergences
  DEFAULT_VARIANTS     {device type: variants a bare run measures}
  SHAPE_SETS           {set name: shape specs}; ``quick``, ``cpu``, ``gpu`` at least
  DEFAULT_SHAPES       {device type: set name a bare run measures}
  parse_shape(spec)    "4096x32000:fp32" -> (shape, dtype) strings; ValueError if malformed
  make_inputs(case, device, seed) -> cases.Inputs   random, never zeros
  accuracy_inputs(inputs, max_elements) -> cases.Inputs   subset the oracle can afford
  floor_bytes(case)    fewest bytes any implementation must move
  PROVIDERS            {provider name: cases.Provider}
  errors(case, inputs, outputs) -> {provider: {"loss_rel_err", "grad_err", "grad_max_abs_err"}}
"""
from . import distill

OPS = {distill.NAME: distill}
