"""Torch-free runtime: load a wan-export artifact directory and generate video.

    from runtime import Motion, Pipeline
    pipe = Pipeline.from_dir("artifacts/small")
    frames = pipe("reference.png", frames=17, steps=20, seed=0)   # uint8 (T, H, W, 3)
    frames = pipe("reference.png", motion=Motion(move=(0.3, 0.0), turn=30))
"""

from runtime.errors import WanError
from runtime.motion import Motion
from runtime.pipeline import Generation, Pipeline

__all__ = ["Pipeline", "Generation", "Motion", "WanError"]
