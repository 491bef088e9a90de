"""The PyTorch reference pipeline: the oracle the runtime is checked against.

Flow matching: x_sigma = (1 - sigma) * x0 + sigma * noise, the DiT predicts v = noise - x0.
Sigmas run from 1 to 0 in `steps` uniform steps, shifted by sigma' = s*sigma / (1 + (s-1)*sigma)
(more steps at high noise); the DiT sees t = 1000 * sigma'. CFG: v = v_u + g * (v_c - v_u),
both branches in one batch-2 call; g == 1 skips the unconditional branch. Guidance rescale
(`rescale_frames`) then pulls each latent frame of the guided clean estimate back to the spread
of the conditional one. Latent frame 0 is the reference latent itself (causal VAE), so it is
given, clean, rather than denoised (`with_reference_frame`, as in training): the DiT's input
always carries it, and the unconditional branch carries zeros there as in its cross-attention
context. The motion maps (runtime/motion.py) say where the reference's content is in each latent
frame; the unconditional branch gets identity maps.

Solvers (both return the next sample and this step's x0 estimate, which the next step of a
multistep solver takes back; no hidden step counter):
    euler    x <- x + (sigma_next - sigma) * v
    dpm++2m  DPM-Solver++(2M) in data prediction, written for flow matching
             (alpha = 1 - sigma); first order on the first step, on the step after sigma = 1
             (its log-SNR is -inf) and on the last step (to sigma = 0).

The runtime's numpy solvers (runtime/solvers.py) are a separate implementation of the same
formulas, tested against these on the same noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from export.dit import WanDiT
from export.vae import WanVAE
from runtime.motion import identity_maps


def flow_sigmas(steps: int, shift: float) -> torch.Tensor:
    """steps + 1 shifted sigmas from 1 to 0 (float64)."""
    s = (steps - torch.arange(steps + 1, dtype=torch.float64)) / steps
    return shift * s / (1 + (shift - 1) * s)


def euler_step(x, v, sigmas, i, prev_x0=None):
    s, t = float(sigmas[i]), float(sigmas[i + 1])
    return x + (t - s) * v, x - s * v


def dpmpp_2m_step(x, v, sigmas, i, prev_x0=None):
    s, t = float(sigmas[i]), float(sigmas[i + 1])
    x0 = x - s * v
    if t == 0.0:
        return x0, x0
    # exp(-h) with h = lambda_t - lambda_s, lambda = log(alpha / sigma): finite at sigma_s = 1
    exp_neg_h = (t * (1 - s)) / ((1 - t) * s)
    d = x0
    prev_s = float(sigmas[i - 1]) if i > 0 else 1.0
    if prev_x0 is not None and prev_s < 1.0:
        lam = lambda sig: math.log((1 - sig) / sig)
        r = (lam(s) - lam(prev_s)) / (lam(t) - lam(s))
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
    return (t / s) * x - (1 - t) * (exp_neg_h - 1) * d, x0


SOLVERS = {"euler": euler_step, "dpm++2m": dpmpp_2m_step}


def rescale_frames(v, v_cond, x, sigma: float, rescale: float):
    """Guidance rescale on the clean estimate, per latent frame (runtime/solvers.py says why):
    x0_g = x - sigma v, x0_c = x - sigma v_c, r = std(x0_c) / std(x0_g) over each frame's
    (C, h, w); x0 = x0_g * (1 + rescale * (r - 1)); returns (x - x0) / sigma, computed as
    v - rescale * (r - 1) / sigma * x0_g."""
    x0_g, x0_c = x - sigma * v, x - sigma * v_cond  # (B, C, F, h, w)
    dims = (1, 3, 4)
    r = x0_c.std(dim=dims, keepdim=True, correction=0) / x0_g.std(dim=dims, keepdim=True, correction=0)
    return v - (rescale / sigma) * (r - 1) * x0_g


def with_reference_frame(x, ref_latent):
    """x with latent frame 0 replaced by the clean reference latent. Frame 0 of a video latent
    *is* the reference latent (the causal VAE encodes video frame 0 alone, like the image), so
    the DiT is given it rather than asked for it, in training and at every sampling step (as
    Wan2.2's text-image-to-video does); zeros for CFG's unconditional branch."""
    return torch.cat([ref_latent.expand(x.shape[0], -1, -1, -1, -1), x[:, :, 1:]], dim=2)


def to_unit(frames_uint8: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (1, 3, T, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames_uint8)).float() / 127.5 - 1.0
    return x.permute(3, 0, 1, 2)[None]


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """float (1, 3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3)."""
    x = ((video[0].permute(1, 2, 3, 0).clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).numpy()


@dataclass
class ReferencePipeline:
    vae: WanVAE
    dit: WanDiT

    @torch.no_grad()
    def velocity(self, x, sigma: float, refs, motions, guidance: float, rescale: float = 0.0):
        """refs (1 or 2, C, 1, h, w) and motions (1 or 2, F, 2, 3): the condition, then with CFG
        the null one (`sample` builds them once per video); both branches run as one batch-2
        call. `rescale`: guidance rescale."""
        t = torch.full((refs.shape[0],), 1000.0 * sigma, dtype=torch.float32)
        if refs.shape[0] == 1:
            return self.dit(x, t, refs, motions)
        v_c, v_u = self.dit(with_reference_frame(torch.cat([x, x]), refs), t, refs, motions).chunk(2)
        v = v_u + guidance * (v_c - v_u)
        return v if rescale == 0.0 else rescale_frames(v, v_c, x, sigma, rescale)

    @torch.no_grad()
    def sample(self, image: np.ndarray, maps: np.ndarray, noise: np.ndarray, steps: int, guidance: float,
               shift: float, solver: str, guidance_rescale: float, start: torch.Tensor | None = None,
               start_sigma: float = 1.0) -> torch.Tensor:
        """image uint8 (H, W, 3), maps (F, 2, 3) (runtime/motion.py `motion_maps`), noise (1, C, F, h, w)
        -> clean latent (1, C, F, h, w).

        For measurement only (export/quality.py; wan-run always starts from noise): with a
        latent `start`, sampling begins at the first scheduled sigma s <= `start_sigma` from
        (1 - s) start + s noise and runs the remaining steps."""
        ref_latent = self.vae.encode(to_unit(image[None]))  # (1, C, 1, h, w)
        motions = torch.from_numpy(np.asarray(maps, np.float32))[None]  # (1, F, 2, 3)
        refs = ref_latent
        if guidance != 1.0:  # the null condition: no reference, nothing moves
            refs = torch.cat([ref_latent, torch.zeros_like(ref_latent)])
            motions = torch.cat([motions, torch.from_numpy(identity_maps(motions.shape[1]))[None]])
        sigmas = flow_sigmas(steps, shift)
        first = int((sigmas > start_sigma).sum()) if start is not None else 0
        x = torch.from_numpy(noise).float()
        if first:
            s = float(sigmas[first])
            x = (1 - s) * start + s * x
        x = with_reference_frame(x, ref_latent)
        step, x0 = SOLVERS[solver], None
        for i in range(first, steps):
            v = self.velocity(x, float(sigmas[i]), refs, motions, guidance, guidance_rescale)
            x, x0 = step(x, v, sigmas, i, x0)
            x = with_reference_frame(x, ref_latent)
        return x

    @torch.no_grad()
    def generate(self, image: np.ndarray, maps: np.ndarray, noise: np.ndarray, steps: int, guidance: float,
                 shift: float, solver: str, guidance_rescale: float, start: torch.Tensor | None = None,
                 start_sigma: float = 1.0) -> torch.Tensor:
        """`sample`, then decode: video (1, 3, T, H, W) in [-1, 1]."""
        return self.vae.decode(self.sample(image, maps, noise, steps, guidance, shift, solver,
                                           guidance_rescale, start, start_sigma))
