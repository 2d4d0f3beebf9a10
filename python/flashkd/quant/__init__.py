"""Quantized student matmuls for quantization-aware distillation and
inference (issue #6): ternary (BitNet b1.58), int8 and group-wise int4
weights; :class:`QuantLinear`, :func:`quantize_student`, packing helpers and
functional forms over ``torch.ops.flashkd.*`` kernels."""
from .formats import SCHEMES, dequantized_weight, pack, unpack
from .functional import cpu_int8_kernel, int4_linear, int8_matmul, quant_linear, quantize_activations, ternary_matmul
from .linear import QuantLinear
from .student import freeze_student, quantize_student

__all__ = ["QuantLinear", "quantize_student", "freeze_student", "pack", "unpack", "SCHEMES", "quantize_activations",
           "int8_matmul", "ternary_matmul", "int4_linear", "quant_linear", "dequantized_weight", "cpu_int8_kernel"]
