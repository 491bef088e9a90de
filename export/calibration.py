"""Calibration data: real stage inputs captured along denoising trajectories of the reference.

The DiT's inputs at sigma 1 (pure noise) and sigma 0 (a clean latent) differ completely, so the
int8 ranges and the fp16 range checks use every timestep of several seeded trajectories, CFG
batch included (conditional + null reference, as the runtime calls it). The encoder sees the
reference images, the decoder the trajectories' final latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from export.config import ModelConfig
from export.dit import WanDiT
from export.pipeline import ReferencePipeline, to_unit
from export.vae import WanVAE
from runtime.motion import image_motion_maps

Samples = dict[str, list[dict[str, np.ndarray]]]  # stage -> inputs by name


@dataclass(frozen=True)
class CalibrationConfig:
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    holdout_seeds: tuple[int, ...] = (100, 101)  # for the quality report, never calibrated on

    def to_dict(self, cfg: ModelConfig) -> dict:
        v, s = cfg.video, cfg.sampler
        return {"seeds": list(self.seeds), "holdout_seeds": list(self.holdout_seeds),
                "frames": v.frames, "height": v.height, "width": v.width, "steps": s.steps,
                "guidance": s.guidance, "shift": s.shift, "solver": s.solver,
                "images": "export.calibration.reference_image(seed): synthetic subject on a plain background",
                "motion": "runtime.motion.image_motion_maps(image, None, seed, ...): a random motion"}


def reference_image(seed: int, height: int, width: int) -> np.ndarray:
    """A seeded reference-like image: a coloured ellipse on a plain background, uint8 (H, W, 3)."""
    rng = np.random.default_rng(seed)
    bg, fg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    ry, rx = rng.uniform(0.1, 0.3) * height, rng.uniform(0.1, 0.3) * width
    yy, xx = np.mgrid[0:height, 0:width]
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    return np.where(inside[..., None], fg, bg).astype(np.uint8)


class _Recorder(torch.nn.Module):
    """Wraps the DiT and keeps a numpy copy of every call's inputs."""

    def __init__(self, dit: WanDiT):
        super().__init__()
        self.dit, self.calls = dit, []

    def forward(self, latent, timestep, ref_latent, motion):
        self.calls.append({"latent": latent.numpy().copy(), "timestep": timestep.numpy().copy(),
                           "ref_latent": ref_latent.numpy().copy(), "motion": motion.numpy().copy()})
        return self.dit(latent, timestep, ref_latent, motion)


def capture(vae: WanVAE, dit: WanDiT, cfg: ModelConfig, seeds: tuple[int, ...]) -> Samples:
    """Stage inputs from one trajectory per seed at the preset's default video and sampler."""
    v, s, g = cfg.video, cfg.sampler, cfg.geometry
    recorder = _Recorder(dit)
    pipe = ReferencePipeline(vae, recorder)
    samples: Samples = {"vae_encoder": [], "dit": [], "vae_decoder": []}
    shape = (1, g.latent_channels, g.frames_to_latent(v.frames),
             v.height // g.spatial_stride, v.width // g.spatial_stride)
    for seed in seeds:
        image = reference_image(seed, v.height, v.width)
        noise = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        maps, _ = image_motion_maps(image, None, seed, v.frames, g)
        latent = pipe.sample(image, maps, noise, s.steps, s.guidance, s.shift, s.solver, s.guidance_rescale)
        samples["vae_encoder"].append({"video": to_unit(image[None]).numpy()})
        samples["vae_decoder"].append({"latent": latent.numpy()})
    samples["dit"] = recorder.calls
    return samples
