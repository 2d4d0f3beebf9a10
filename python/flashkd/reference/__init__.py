"""Pure-torch oracles of every flashkd op, written from DESIGN.md §2 for
clarity, not speed; the tests compare the kernels against them. One module per
op family, re-exported here: ``flashkd.reference.distill_loss`` etc."""
from . import quant  # noqa: F401  (flashkd.reference.quant: quantized matmuls)
from . import tome  # noqa: F401  (flashkd.reference.tome: token merging and pruning)
from .losses import (cross_entropy, distill_loss, divergence, head_logits, linear_cross_entropy, linear_distill_loss,
                     soft_cap, taid_logit)

__all__ = ["cross_entropy", "distill_loss", "divergence", "linear_cross_entropy", "linear_distill_loss", "taid_logit",
           "head_logits", "soft_cap"]
