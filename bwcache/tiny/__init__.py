"""Tiny Shapes: the small text-to-video model shipped with BWCache so everything runs offline on a CPU.

A stock diffusers `WanTransformer3DModel` (small config) denoises 32x32 RGB clips in pixel space, conditioned by a
word-level text encoder over prompts like "a red square moving right".
"""

from .pipeline import DEFAULTS, LIMITS, TinyShapesPipeline, TinyShapesPipelineOutput, load_pipeline

__all__ = ["DEFAULTS", "LIMITS", "TinyShapesPipeline", "TinyShapesPipelineOutput", "load_pipeline"]
