"""Reference models for flashkd examples, tests and benchmarks."""
from .lm import PRESETS, DecoderLM, LMConfig
from .vit import VIT_PRESETS, ViTConfig, VisionTransformer

__all__ = ["DecoderLM", "LMConfig", "PRESETS", "VIT_PRESETS", "ViTConfig", "VisionTransformer"]
