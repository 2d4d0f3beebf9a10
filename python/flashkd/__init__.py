"""flashkd: fused C++/CUDA kernels for knowledge distillation in PyTorch."""
from . import _ops  # noqa: F401  (loads the kernels)
from . import models, nn, prune, quant, reference, tome
from ._ops import cpu_gemm_dtype, cpu_isa, has_cuda_kernels
from .functional import DIVERGENCES, distill_loss
from .linear import linear_cross_entropy, linear_distill_loss
from .taid import TAIDSchedule

__version__ = "0.1.0"

__all__ = ["distill_loss", "linear_cross_entropy", "linear_distill_loss", "DIVERGENCES", "TAIDSchedule", "nn", "models", "reference", "tome", "prune", "quant", "has_cuda_kernels", "cpu_isa", "cpu_gemm_dtype"]
