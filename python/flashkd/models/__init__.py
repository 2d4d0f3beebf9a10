"""Reference models for flashkd examples, tests and benchmarks."""
from .lm import PRESETS, DecoderLM, LMConfig

__all__ = ["DecoderLM", "LMConfig", "PRESETS"]
