"""Training the VAE and the DiT from scratch on procedural clips (export/synthetic.py).

    stage 1  VAE    reconstruction (L1 + MSE) of a posterior sample + a small KL term, on
                    9x32x32 crops (the VAE is fully convolutional and causal: a window
                    teaches what a 17x128x128 clip needs, and steps were the bottleneck)
    stats           per-channel mean/std of the posterior mean over the DiT's training clips,
                    stored in the VAE's `latent_mean` / `latent_std` buffers
    stage 2  DiT    flow matching on normalized latents of whole clips:
                    x_sigma = (1 - sigma) x0 + sigma noise, target v = noise - x0,
                    timestep 1000 sigma; sigma is shifted-uniform (`DiTTraining.shift`);
                    reference latent = `WanVAE.encode(frame 0)`, given twice: as the
                    cross-attention context and, clean, as latent frame 0 of the input (the
                    loss covers frames 1..), and the clip's own motion as the DiT's motion
                    maps (runtime/motion.py); the reference replaced by zeros and the motion
                    by the identity (the null condition of CFG) with probability `p_uncond`

Both models start from a working point rather than noise (`init_for_training`): the VAE as a
box-filter autoencoder (~24 dB before its first step), the DiT with adaLN-zero blocks and a
cross-attention that looks at the reference patch at its own position. From a plain random
start neither learned enough in the 30-minute CPU budget.

Each stage runs a fixed number of steps under a wall-clock cap (`schedule`): on a machine as
fast as the defaults assume, the run is fixed by the seed (data, init and noise are all seeded;
clip k of a stream is the same whatever batch it lands in); on a slower one the cap ends the
stage early, with the learning rate annealed by the clock. With one thread a rerun gives the
same weights bit for bit; with two (the default, to fit 30 minutes) PyTorch's threaded kernels
sum in a varying order, so two runs part after ~100 steps and end at the same quality, not
the same bits (measured: see README). Every step goes to a JSONL log next to the weights, the
last line a summary.

    python -m export.train --preset small --out export/pretrained/small.safetensors
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from export.config import ModelConfig
from export.dit import WanDiT
from export.pipeline import to_unit, with_reference_frame
from export.quality import vae_psnr
from export.synthetic import Clip, ClipSpec, clip_rng, make_clips, motion_of, random_crop
from export.vae import ResidualBlock, WanVAE
from export.weights import load_checkpoint, save_checkpoint
from runtime.motion import motion_maps, subject_centre
from runtime.stages import Geometry

log = logging.getLogger(__name__)

# Data streams of one seed (synthetic.clip_rng): disjoint clips for each use.
STREAM_VAE, STREAM_DIT, STREAM_VAL = 1, 2, 3


# Defaults: both stages together take 22 to 27 minutes with both cores of the 2-core dev
# machine for the small preset (VAE base_dim 8, DiT dim 128): measured 0.12-0.15 s per VAE
# step, 0.24-0.33 s per DiT step (one thread: 0.21 s and 0.55 s; the motion maps' per-frame
# cross-attention made a DiT step ~10% slower). The caps (29 minutes together) keep a slower
# machine inside the 30-minute budget.

@dataclass(frozen=True)
class VAETraining:
    steps: int = 3800
    batch: int = 4
    frames: int = 9  # 3 latent frames: every tap of the latent-level time convs sees data
    crop: int = 32  # small crops, many steps: steps, not pixels, were the measured bottleneck
    lr: float = 1e-3  # 3e-4 and 2e-3 both did worse in 2.5-minute trials
    warmup: int = 100
    min_lr: float = 0.05  # fraction of lr at the end of the cosine
    weight_decay: float = 0.0
    kl_weight: float = 1e-4  # per latent element, relative to the per-pixel reconstruction
    # Noise added to the decoder's input, relative to each latent channel's spread in the batch.
    # The DiT's errors reach the decoder as exactly such noise; a decoder that never saw any
    # turns them into saturated coloured speckles. Measured on generated clips (1600 DiT steps):
    # 0.2 instead of 0.1 cut the colour error vs the reference from 92 to 77 (0.0: 89); with
    # the full schedule 0.3 gave smoother blobs but less motion and 28.3 dB held-out PSNR.
    latent_noise: float = 0.2
    grad_clip: float = 1.0
    minutes: float = 10.5  # wall-clock cap for this stage
    eval_clips: int = 4  # held-out 17-frame clips for the PSNR logged after the stage


@dataclass(frozen=True)
class DiTTraining:
    steps: int = 3000
    batch: int = 8
    lr: float = 2e-3  # beat 1e-3 clearly in 270-step trials (val loss 0.58 vs 0.66)
    warmup: int = 100
    min_lr: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    p_uncond: float = 0.1  # reference dropped (zeros) this often: CFG's unconditional branch
    # Of the rest, this many see the identity motion with their reference (the measured recipe;
    # with it, the identity map makes the subject stay in place: README, "Motion as an input").
    p_no_motion: float = 0.1
    # Training sigmas are shifted like the sampler's (`sample_sigmas`), but harder: the outline
    # and the path are decided at high noise, and shift 10 puts more steps there than the
    # sampler's 5. Measured, 4 runs against 3 on 16 held-out clips (README "Training shift"):
    # travel 19.0 vs 16.1 px (more in every run), shape IoU 0.570 vs 0.534, colour and
    # background error ~2 worse. Sampling keeps shift 5.
    shift: float = 10.0
    # Clips encoded once and reused; one costs ~0.6 steps. A 32-clip pool seen 67 times each
    # already lost 0.05 of validation loss to a 256-clip one at 270 steps: 600 x 40 views.
    pool_clips: int = 600
    val_clips: int = 8
    val_every: int = 100
    # Wall-clock cap for this stage, encoding included. The shipped run needed 17.5 minutes
    # (76 s encoding, then 0.33 s a step), so the cap leaves one minute of slack.
    minutes: float = 18.5
    # The weights that ship are an exponential moving average of the trained ones (decay
    # ramped up as (1 + step) / (10 + step)): averaging out the last steps' noise matters most
    # for a model this far from converged. In 3,000 steps the ramp ends at 0.997, below this
    # cap, so the ramp is the average that ships; capping at 0.995 instead measured the same
    # (one run, both averages tracked: README, "Tried on this CPU").
    ema: float = 0.998


@dataclass(frozen=True)
class TrainingConfig:
    seed: int = 0
    vae: VAETraining = field(default_factory=VAETraining)
    dit: DiTTraining = field(default_factory=DiTTraining)
    clips: ClipSpec = field(default_factory=ClipSpec)  # frames/size are taken from the model
    save_dtype: str = "float16"  # halves the file; load_checkpoint casts back to float32

    def clip_spec(self, model: ModelConfig) -> ClipSpec:
        v = model.video
        return dataclasses.replace(self.clips, frames=v.frames, height=v.height, width=v.width)


# --- schedule, init, logging ------------------------------------------------------------------

def learning_rate(step: int, progress: float, base: float, warmup: int, min_frac: float) -> float:
    """Linear warmup over the first `warmup` steps, then a cosine from `base` down to
    `min_frac * base` as `progress` goes from warmup's end to 1."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def schedule(steps: int, minutes: float, base_lr: float, warmup: int, min_frac: float,
             start: float | None = None):
    """Yield (step, lr) for a stage of `steps` steps capped at `minutes` of wall clock.

    Progress is the step fraction, or the elapsed fraction of the cap when that is further
    along: on a machine as fast as the step counts assume, the run depends on steps only (and
    is reproducible); on a slower one the cosine follows the clock, so the stage still ends
    annealed, at the cap, with fewer steps (the log's `stopped_by` says which happened).
    """
    start = time.monotonic() if start is None else start
    cap = max(minutes * 60.0, 1e-9)
    for step in range(steps):
        elapsed = (time.monotonic() - start) / cap
        if elapsed >= 1.0:
            return
        after_warmup = (step - warmup) / max(1, steps - warmup)
        clock = (elapsed - warmup / steps) / max(1e-9, 1 - warmup / steps)
        yield step, learning_rate(step, max(after_warmup, clock), base_lr, warmup, min_frac)


# The VAE's initial trunk carries pass-through channels: 0-2 +RGB, 3-5 -RGB (silu(x) - silu(-x)
# = x undoes the SiLU before each head exactly) and 6 a constant "rail". The rail dominates
# every RMS norm's denominator, which then acts as a fixed scale (that gamma undoes), so the
# initial VAE is linear along the trunk. Its weights are frozen during training (`rail_masks`):
# any conv reading a channel this large would otherwise move its outputs by ~rail * lr a step.
_PLUS, _MINUS, _RAIL = 0, 3, 6
_PASS = 7
_RAIL_LEVEL = 20.0
_FREE_GAIN = 0.3  # free channels start small next to the rail, for the same reason


def _he(weight: torch.Tensor, gen: torch.Generator, gain: float = 1.0) -> torch.Tensor:
    fan_in = weight[0].numel()
    return torch.randn(weight.shape, generator=gen) * gain * math.sqrt(2.0 / fan_in)


def _vae_trunk(vae: WanVAE):
    """The VAE's parts by role: trunk convs with their tap(s) and output groups, residual
    branches, stems and heads (the two 3-channel ends of the trunk)."""
    from export.vae import Resample

    trunk, branches = [], []
    for part in (vae.encoder, vae.decoder):
        for m in part.modules():
            if isinstance(m, ResidualBlock):
                branches.append(m.residual)
                if not isinstance(m.shortcut, nn.Identity):
                    trunk.append((m.shortcut, [(0, 0, 0)], 1))
            elif isinstance(m, Resample):
                if m.mode.startswith("downsample"):
                    # stride-2 conv after right/bottom padding: taps (0..1, 0..1) = the 2x2 block
                    trunk.append((m.resample[1], [(0, 0), (0, 1), (1, 0), (1, 1)], 1))
                else:
                    trunk.append((m.resample[1], [(1, 1)], 1))  # after nearest 2x: replicate
                if m.mode == "downsample3d":
                    trunk.append((m.time_conv, [(2, 0, 0)], 1))  # keep the newer frame of a pair
                elif m.mode == "upsample3d":
                    trunk.append((m.time_conv, [(2, 0, 0)], 2))  # both frames of a pair = input
    stems = [vae.encoder.conv1, vae.decoder.conv1]
    heads = [vae.encoder.head, vae.decoder.head]
    return trunk, branches, stems, heads


def passthrough_possible(vae: WanVAE) -> bool:
    cfg = vae.cfg
    return cfg.base_dim * min(cfg.dim_mult) > _PASS and cfg.z_dim >= 3


def _init_vae(vae: WanVAE, gen: torch.Generator) -> None:
    """The VAE starts as a box-filter autoencoder: latent channels 0-2 are the 8x8 mean RGB of
    every 4th frame and the decoder repeats them back (about 24 dB on the synthetic clips), so
    training starts from working colours and spends its steps on edges and motion.

    The residual branches start at zero (last conv zeroed) with their input norm made a fixed
    scale; between them the trunk is linear (stem, shortcuts, resampling convs). The channels
    past the pass-through ones are free He-init features for the branches and heads to use.
    Needs `passthrough_possible`; otherwise plain He init with zeroed branches.
    """
    trunk, branches, stems, heads = _vae_trunk(vae)
    for m in vae.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            m.weight.copy_(_he(m.weight, gen))
            m.bias.zero_()
    for branch in branches:
        branch[-1].weight.zero_()
    z = vae.cfg.z_dim
    # conv1: posterior mean = the head's first z channels; log-variance -6 (std 0.05) to begin
    # with, so sampling noise does not bury the latents before the encoder has found a scale.
    vae.conv1.weight.copy_(torch.eye(2 * z).view(2 * z, 2 * z, 1, 1, 1))
    vae.conv1.weight[z:] = 0.0
    vae.conv1.bias[z:] = -6.0
    vae.conv2.weight.copy_(torch.eye(z).view(z, z, 1, 1, 1))
    if not passthrough_possible(vae):
        return
    for branch in branches:
        _linearize_norm(branch[0])
    for conv, taps, copies in trunk:
        w = _he(conv.weight, gen, _FREE_GAIN)  # (out, in, *kernel)
        w[:, _RAIL] = 0.0
        group = w.shape[0] // copies
        for g in range(copies):
            w[g * group:g * group + _PASS] = 0.0
            for c in range(_PASS):
                for tap in taps:
                    w[(g * group + c, c, *tap)] = 1.0 / len(taps)
        conv.weight.copy_(w)
    for stem in stems:  # RGB in the encoder, latent channels 0-2 in the decoder
        w = _he(stem.weight, gen, _FREE_GAIN)
        w[:_PASS] = 0.0
        for c in range(3):
            w[(_PLUS + c, c, 2, 1, 1)] = 1.0  # current frame, centre pixel
            w[(_MINUS + c, c, 2, 1, 1)] = -1.0
        stem.weight.copy_(w)
        stem.bias[_RAIL] = _RAIL_LEVEL
    for head in heads:
        _linearize_norm(head[0])
        w = head[2].weight
        w[:3] = 0.0  # latent channels 0-2 / output RGB = silu(+x) - silu(-x) = x
        for c in range(3):
            w[(c, _PLUS + c, 2, 1, 1)] = 1.0
            w[(c, _MINUS + c, 2, 1, 1)] = -1.0
    vae.decoder.head[2].weight[:, _PASS:] = 0.0  # the output starts as the box reconstruction


def _linearize_norm(norm: nn.Module) -> None:
    """An RMS norm reading the trunk: the rail fixes its denominator near _RAIL_LEVEL/sqrt(C);
    gamma undoes that scale and drops the rail itself."""
    norm.gamma.fill_(_RAIL_LEVEL / math.sqrt(norm.gamma.shape[0]))
    norm.gamma[_RAIL] = 0.0


def rail_masks(vae: WanVAE) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, frozen elements) that keep the rail constant and unread: trunk convs
    neither read nor write it, stems and branch outputs do not write it. Empty when the VAE
    has no rail (too narrow, or initialized otherwise)."""
    if not passthrough_possible(vae) or vae.encoder.conv1.bias[_RAIL].item() != _RAIL_LEVEL:
        return []
    trunk, branches, stems, _ = _vae_trunk(vae)
    masks = []
    for conv, _, copies in trunk:
        w, b = torch.zeros_like(conv.weight, dtype=torch.bool), torch.zeros_like(conv.bias, dtype=torch.bool)
        w[:, _RAIL] = True
        group = w.shape[0] // copies
        for g in range(copies):
            w[g * group + _RAIL] = True
            b[g * group + _RAIL] = True
        masks += [(conv.weight, w), (conv.bias, b)]
    for conv in [*stems, *(branch[-1] for branch in branches)]:
        w, b = torch.zeros_like(conv.weight, dtype=torch.bool), torch.zeros_like(conv.bias, dtype=torch.bool)
        w[_RAIL], b[_RAIL] = True, True
        masks += [(conv.weight, w), (conv.bias, b)]
    return masks


def _init_dit(dit: WanDiT, gen: torch.Generator) -> None:
    """Xavier linears/patch convs, adaLN-zero (time projection and modulation tables zeroed,
    so every gate starts at 0), the ungated cross-attention output and `proj_out` zeroed: the
    network starts as the identity on its tokens and predicts v = 0.

    Cross-attention starts *positional* (`_positional_cross_attention`): each video token looks
    at the reference patch that the frame's motion map puts at its own (h, w) (with the identity
    map: the patch at its (h, w)). That pattern is what reference conditioning needs most (the
    subject where the motion takes it, the background around it) and what the DiT is slowest to
    find from a random start; the query/key weights can learn content-based attention on top.
    """
    for m in dit.modules():
        if isinstance(m, (nn.Linear, nn.Conv3d)):
            w = m.weight.view(m.weight.shape[0], -1)  # (out, in * kernel)
            bound = math.sqrt(6.0 / (w.shape[0] + w.shape[1]))
            m.weight.copy_((torch.rand(m.weight.shape, generator=gen) * 2 - 1) * bound)
            if m.bias is not None:
                m.bias.zero_()
    emb = dit.condition_embedder
    for lin in (emb.time_embedder.linear_1, emb.time_embedder.linear_2):
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.02)
    zeroed = [emb.time_proj.weight, emb.time_proj.bias, dit.proj_out.weight, dit.proj_out.bias]
    for block in dit.blocks:
        zeroed += [block.scale_shift_table, block.attn2.to_out[0].weight, block.attn2.to_out[0].bias]
        if hasattr(block, "scale_shift_table_temporal"):
            zeroed.append(block.scale_shift_table_temporal)
        _positional_cross_attention(block.attn2, dit.cfg)
    for p in zeroed:
        p.zero_()
    dit.scale_shift_table.copy_(torch.randn(dit.scale_shift_table.shape, generator=gen) / dit.cfg.dim**0.5)


_POSITIONAL_SHARPNESS = 12.0  # logit margin per unit of the cosine sum: neighbours get ~e^-5


def _positional_cross_attention(attn: nn.Module, cfg) -> None:
    """Constant queries and keys (zero weights, equal biases) that live only in the rotary
    pairs of the h and w axes with frequencies in [0.15, 1]. After RoPE, q.k is then
    sum_pairs cos(frequency * offset): largest at offset (0, 0), whatever the frame (the t
    rotation is the same for every reference key, so it cancels in the softmax)."""
    from export.rope import axes_dims

    d, heads = cfg.head_dim, cfg.num_heads
    dt, dh, dw = axes_dims(d)
    pairs = []
    for start, size in ((dt, dh), (dt + dh, dw)):
        freqs = 1.0 / cfg.rope_theta ** (torch.arange(0, size, 2, dtype=torch.float32) / size)
        pairs += [start + 2 * i for i, f in enumerate(freqs.tolist()) if 0.15 <= f <= 1.0]
    if not pairs:
        return
    c = torch.zeros(d)
    c[pairs] = 1.0  # the first channel of each chosen pair
    # RMSNorm scales c to entries sqrt(d / n) (n = len(pairs)), gamma multiplies them, so
    # q.k / sqrt(d) = gamma^2 * sqrt(d) / n * sum cos(...): gamma sets the sharpness.
    gamma = math.sqrt(_POSITIONAL_SHARPNESS * len(pairs) / math.sqrt(d))
    for lin, norm in ((attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k)):
        lin.weight.zero_()
        lin.bias.copy_(c.repeat(heads))
        norm.weight.fill_(gamma)


def init_for_training(vae: WanVAE, dit: WanDiT, seed: int) -> None:
    """Initialization for training from scratch. (export/weights.py's `init_weights` is for
    parity tests and keeps every path live and random; this one gives both models a working
    starting point: see `_init_vae` and `_init_dit`.)"""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _init_vae(vae, gen)
        _init_dit(dit, gen)


class LossLog:
    """One JSON object per line; flushed as written so a crashed run keeps its history.
    A context manager; `path=None` logs nothing."""

    def __init__(self, path: Path | None):
        self.path = path
        self._file = open(path, "w") if path is not None else None  # noqa: SIM115 (closed by __exit__)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, **record) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _clip_grad(params, max_norm: float) -> float:
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def _optimizer(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; weight decay on weight matrices and kernels only, not on biases, norm gains
    (1-D, or the VAE's (C, 1, 1, 1) gamma) and modulation tables."""
    def decays(name: str, p: torch.Tensor) -> bool:
        return p.ndim >= 2 and "scale_shift_table" not in name and not name.endswith("gamma")

    params = list(module.named_parameters())
    return torch.optim.AdamW([{"params": [p for n, p in params if decays(n, p)], "weight_decay": weight_decay},
                              {"params": [p for n, p in params if not decays(n, p)], "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.99))


# --- stage 1: VAE -----------------------------------------------------------------------------

def vae_crops(seed: int, step: int, train: VAETraining, spec: ClipSpec) -> torch.Tensor:
    """Batch `step` of VAE training crops: float (B, 3, frames, crop, crop) in [-1, 1]
    (frames and crop size limited to the clip's)."""
    frames, size = min(train.frames, spec.frames), min(train.crop, spec.height, spec.width)
    crops = [random_crop(clip_rng(seed, STREAM_VAE, step * train.batch + i), spec, frames, size)
             for i in range(train.batch)]
    return torch.cat([to_unit(c) for c in crops])


def vae_loss(vae: WanVAE, video: torch.Tensor, kl_weight: float, gen: torch.Generator,
             latent_noise: float = 0.0):
    """Reconstruction L1 + MSE of a posterior sample (plus `latent_noise` times each channel's
    batch std of Gaussian noise), plus kl_weight * KL to N(0, I).
    Works on raw (unnormalized) latents: the normalization constants come after training."""
    mu, logvar = vae.conv1(vae.encoder(video)).chunk(2, dim=1)  # (B, z, F, h, w) each
    logvar = logvar.clamp(-20.0, 10.0)
    z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=gen)
    if latent_noise:
        spread = mu.detach().std(dim=(0, 2, 3, 4), keepdim=True)  # (1, z, 1, 1, 1)
        z = z + latent_noise * spread * torch.randn(mu.shape, generator=gen)
    recon = vae.decoder(vae.conv2(z))  # unclamped: the clamp in `decode` would stop gradients
    l1, mse = (recon - video).abs().mean(), (recon - video).pow(2).mean()
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    return l1 + mse + kl_weight * kl, {"l1": l1.item(), "mse": mse.item(), "kl": kl.item()}


def train_vae(vae: WanVAE, train: VAETraining, spec: ClipSpec, seed: int, loss_log: LossLog,
              progress: bool = True) -> dict:
    """Stage 1 in place on `vae`; returns steps done, what stopped the stage, seconds."""
    vae.train()
    # Frozen elements get zero gradients: Adam then leaves them exactly where they are.
    hooks = [p.register_hook(lambda g, m=m: g.masked_fill(m, 0.0)) for p, m in rail_masks(vae)]
    opt = _optimizer(vae, train.lr, train.weight_decay)
    gen = torch.Generator().manual_seed(seed + 1)
    start, done = time.monotonic(), 0
    bar = tqdm(total=train.steps, desc="VAE", unit="step", disable=not progress, dynamic_ncols=True,
               mininterval=1.0)
    for step, lr in schedule(train.steps, train.minutes, train.lr, train.warmup, train.min_lr, start):
        for group in opt.param_groups:
            group["lr"] = lr
        video = vae_crops(seed, step, train, spec)
        loss, parts = vae_loss(vae, video, train.kl_weight, gen, train.latent_noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = _clip_grad(vae.parameters(), train.grad_clip)
        opt.step()
        psnr_db = 10 * math.log10(4.0 / max(parts["mse"], 1e-12))  # [-1, 1] range: peak-to-peak 2
        loss_log.write(stage="vae", step=step, loss=loss.item(), **parts, psnr_db=psnr_db,
                       grad_norm=grad_norm, lr=lr, elapsed_s=time.monotonic() - start)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr_db:.1f}")
        done = step + 1
    bar.close()
    for h in hooks:
        h.remove()
    vae.eval()
    stopped = "steps" if done == train.steps else "time"
    if stopped == "time":
        log.warning("VAE stage reached its %.1f-minute cap after %d of %d steps (annealed by the "
                    "clock; not bit-reproducible)", train.minutes, done, train.steps)
    return {"steps": done, "stopped_by": stopped, "seconds": time.monotonic() - start}


# --- latent statistics and the DiT's data -----------------------------------------------------

class DiTData(NamedTuple):
    """Encoded clips: latents (N, z, F, h, w), reference latents (N, z, 1, h, w) and motion
    maps (N, F, 2, 3)."""

    latents: torch.Tensor
    refs: torch.Tensor
    motions: torch.Tensor


def clip_motion_maps(clip: Clip, geometry: Geometry) -> np.ndarray:
    """The DiT's motion input for a training clip, (F, 2, 3): its own motion, from the subject's
    centre as the runtime finds it in the reference (not the drawn centre), as wan-run does."""
    spec = ClipSpec(frames=len(clip.frames), height=clip.frames.shape[1], width=clip.frames.shape[2])
    centre, _ = subject_centre(clip.reference)
    return motion_maps(motion_of(clip.subject, spec), centre, spec.frames, spec.height, spec.width,
                       geometry)


@torch.no_grad()
def encode_clips(vae: WanVAE, seed: int, stream: int, count: int, spec: ClipSpec, geometry: Geometry,
                 batch: int = 4, progress: bool = False, desc: str = "encode") -> DiTData:
    """Clips 0..count-1 of (seed, stream), encoded with the VAE's current buffers:
    latents (N, z, F, h, w), reference latents (N, z, 1, h, w), the reference being frame 0
    encoded on its own as a 1-frame video, exactly what the pipelines feed the DiT, and each
    clip's motion maps (N, F, 2, 3)."""
    latents, refs, maps = [], [], []
    for i in tqdm(range(0, count, batch), desc=desc, disable=not progress, dynamic_ncols=True,
                  mininterval=1.0):
        clips = make_clips(seed, min(batch, count - i), spec, stream, start=i)
        video = torch.cat([to_unit(c.frames) for c in clips])  # (b, 3, T, H, W)
        latents.append(vae.encode(video))
        refs.append(vae.encode(video[:, :, :1]))
        maps += [torch.from_numpy(clip_motion_maps(c, geometry)) for c in clips]
    return DiTData(torch.cat(latents), torch.cat(refs), torch.stack(maps))


@torch.no_grad()
def set_latent_stats(vae: WanVAE, raw_latents: torch.Tensor, dtype: torch.dtype) -> None:
    """Per-channel mean/std of raw posterior means (N, z, F, h, w) into the VAE's buffers,
    rounded to `dtype` first, so the constants the DiT trains with are the ones that ship."""
    per_channel = raw_latents.transpose(0, 1).flatten(1)  # (z, N*F*h*w)
    vae.latent_mean.copy_(per_channel.mean(1).to(dtype).float())
    vae.latent_std.copy_(per_channel.std(1).clamp_min(1e-4).to(dtype).float())


def normalize(vae: WanVAE, raw_latents: torch.Tensor) -> torch.Tensor:
    """What `WanVAE.encode` does after the encoder, with the same ops (bitwise the same)."""
    mean, std = vae._stats(raw_latents)
    return (raw_latents - mean) / std


def dit_data(vae: WanVAE, seed: int, spec: ClipSpec, geometry: Geometry, train: DiTTraining,
             fit_stats: bool, save_dtype: torch.dtype, progress: bool = True) -> tuple[DiTData, DiTData]:
    """The DiT's training pool and held-out clips. With `fit_stats`, the latent statistics
    are fitted on the pool's raw latents first (one encoding serves both)."""
    if fit_stats:
        vae.latent_mean.zero_()
        vae.latent_std.fill_(1.0)
    data = encode_clips(vae, seed, STREAM_DIT, train.pool_clips, spec, geometry, progress=progress,
                        desc="encode clips")
    if fit_stats:
        set_latent_stats(vae, data.latents, save_dtype)
        data = DiTData(normalize(vae, data.latents), normalize(vae, data.refs), data.motions)
    return data, encode_clips(vae, seed, STREAM_VAL, train.val_clips, spec, geometry)


# --- stage 2: DiT -----------------------------------------------------------------------------

def sample_sigmas(batch: int, shift: float, gen: torch.Generator) -> torch.Tensor:
    """Stratified uniform u, shifted like the sampler's sigmas (shift*u / (1 + (shift-1)*u)).
    With the sampler's own shift, training would see noise levels in proportion to how often
    sampling visits them; `DiTTraining.shift` is larger, for more high-noise practice. (Some of
    them unshifted, for more low-noise practice, measured no better: half at shift 5, a quarter
    at shift 10.)"""
    u = (torch.randperm(batch, generator=gen) + torch.rand(batch, generator=gen)) / batch
    return shift * u / (1 + (shift - 1) * u)


def flow_matching_loss(dit: WanDiT, x0: torch.Tensor, ref: torch.Tensor, motion: torch.Tensor,
                       shift: float, p_uncond: float, gen: torch.Generator,
                       p_no_motion: float = 0.0) -> torch.Tensor:
    """x0 (B, C, F, h, w), ref (B, C, 1, h, w), motion (B, F, 2, 3): MSE between the DiT's
    velocity and noise - x0 on latent frames 1.., with latent frame 0 of the input being the
    clean reference (`with_reference_frame`, as the pipelines sample). A dropped condition
    (CFG's unconditional branch, `p_uncond`) is zeros in both places the reference goes (the
    cross-attention context and frame 0) and the identity motion; `p_no_motion` of the rest
    keep the reference but get the identity motion.

    Measured against noising frame 0 like the others (the previous recipe, which put frame 0
    back on its flow path while sampling), 3,000 steps each, 2 seeds x 16 held-out clips,
    guidance 2.5 (GPU runs, see README): colour error 44 vs 53, shape IoU 0.56 vs 0.54, travel
    19 vs 15 px. Keeping frame 0 clean in the unconditional branch as well: 49, 0.53, 22 px."""
    B = x0.shape[0]
    sigma = sample_sigmas(B, shift, gen)
    noise = torch.randn(x0.shape, generator=gen)
    s = sigma.view(B, 1, 1, 1, 1)
    keep = torch.rand(B, generator=gen) >= p_uncond
    moves = keep & (torch.rand(B, generator=gen) >= p_no_motion)
    ref = ref * keep.float().view(B, 1, 1, 1, 1)
    motion = torch.where(moves.view(B, 1, 1, 1), motion, torch.eye(2, 3))
    x_sigma = with_reference_frame((1 - s) * x0 + s * noise, ref)
    v = dit(x_sigma, 1000.0 * sigma, ref, motion)
    return F.mse_loss(v[:, :, 1:], (noise - x0)[:, :, 1:])  # frame 0 is given, not predicted


@contextlib.contextmanager
def swapped(params: list[torch.Tensor], others: list[torch.Tensor]):
    """Run with `others`' values in `params` (e.g. the EMA weights), then swap back."""
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        torch._foreach_copy_(params, others)
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, saved)


@torch.no_grad()
def validation_loss(dit: WanDiT, val: DiTData, shift: float) -> float:
    """Flow-matching loss on held-out clips at fixed noise and sigmas (comparable across steps)."""
    dit.eval()
    gen = torch.Generator().manual_seed(1234)
    loss = float(flow_matching_loss(dit, val.latents, val.refs, val.motions, shift, 0.0, gen))
    dit.train()
    return loss


def train_dit(dit: WanDiT, data: DiTData, val_data: DiTData, train: DiTTraining, seed: int,
              loss_log: LossLog, progress: bool = True, start: float | None = None) -> dict:
    """Train on `data` (normalized latents); `val_data` likewise, held out. `start`: when the
    stage began (time.monotonic) if encoding the data counts against its cap."""
    start = time.monotonic() if start is None else start
    dit.train()
    opt = _optimizer(dit, train.lr, train.weight_decay)
    params = list(dit.parameters())
    averaged = [p.detach().clone() for p in params]  # the EMA weights, copied into `dit` at the end
    gen = torch.Generator().manual_seed(seed + 2)
    done, val = 0, float("nan")
    bar = tqdm(total=train.steps, desc="DiT", unit="step", disable=not progress, dynamic_ncols=True,
               mininterval=1.0)
    for step, lr in schedule(train.steps, train.minutes, train.lr, train.warmup, train.min_lr, start):
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(data.latents), (train.batch,), generator=gen)
        loss = flow_matching_loss(dit, data.latents[idx], data.refs[idx], data.motions[idx], train.shift,
                                  train.p_uncond, gen, train.p_no_motion)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = _clip_grad(dit.parameters(), train.grad_clip)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(averaged, params, 1.0 - min(train.ema, (1 + step) / (10 + step)))
        record = {"stage": "dit", "step": step, "loss": loss.item(), "grad_norm": grad_norm, "lr": lr,
                  "elapsed_s": time.monotonic() - start}
        if train.val_every and (step + 1) % train.val_every == 0:
            with swapped(params, averaged):
                val = record["val_loss"] = validation_loss(dit, val_data, train.shift)
        loss_log.write(**record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", val=f"{val:.4f}")
        done = step + 1
    bar.close()
    with torch.no_grad():
        for p, a in zip(params, averaged):
            p.copy_(a)
    dit.eval()
    stopped = "steps" if done == train.steps else "time"
    if stopped == "time":
        log.warning("DiT stage reached its %.1f-minute cap after %d of %d steps (annealed by the "
                    "clock; not bit-reproducible)", train.minutes, done, train.steps)
    return {"steps": done, "stopped_by": stopped, "seconds": time.monotonic() - start,
            "val_loss": validation_loss(dit, val_data, train.shift)}


# --- both stages ------------------------------------------------------------------------------

def log_path_for(out: Path) -> Path:
    """`weights.safetensors` -> `weights.log.jsonl` (next to the weights)."""
    return out.with_name(out.name.removesuffix(".safetensors") + ".log.jsonl")


def train(model: ModelConfig, training: TrainingConfig, out: str | Path | None,
          init: str | Path | None = None, progress: bool = True) -> dict:
    """Train (or continue from `init`) the VAE and DiT of `model`; save them to `out`.

    A stage with 0 steps is skipped: with `init`, `vae.steps=0` keeps the checkpoint's VAE and
    latent statistics and trains only the DiT. Returns a summary (also the log's last line).
    """
    t0 = time.monotonic()
    spec = training.clip_spec(model)
    save_dtype = getattr(torch, training.save_dtype)
    torch.manual_seed(training.seed)
    vae, dit = WanVAE(model.vae), WanDiT(model.dit, model.vae.z_dim)
    if init is not None:
        load_checkpoint(init, vae, dit)
    else:
        init_for_training(vae, dit, training.seed)
    out = Path(out) if out is not None else None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    summary: dict = {"model": model.name, "threads": torch.get_num_threads(),
                     "training": dataclasses.asdict(training)}
    with LossLog(log_path_for(out) if out is not None else None) as loss_log:
        if training.vae.steps > 0:
            summary["vae"] = train_vae(vae, training.vae, spec, training.seed, loss_log, progress)
            with torch.no_grad():  # the DiT learns the latents of the VAE as it will be shipped
                for p in vae.parameters():
                    p.copy_(p.to(save_dtype).float())
            if training.vae.eval_clips:
                summary["vae"]["heldout_psnr_db"] = vae_psnr(vae, training.seed, training.vae.eval_clips,
                                                             spec, stream=STREAM_VAL)["mean_db"]
        vae.eval()
        dit_start = time.monotonic()
        fit_stats = training.vae.steps > 0 or init is None  # a new VAE needs new constants
        if fit_stats or training.dit.steps > 0:
            data, val_data = dit_data(vae, training.seed, spec, model.geometry, training.dit, fit_stats,
                                      save_dtype, progress)
            log.info("DiT data: %d clips, latents %s, %.0f s", len(data.latents),
                     tuple(data.latents.shape[1:]),
                     time.monotonic() - dit_start)
        summary["latent_mean"] = vae.latent_mean.tolist()
        summary["latent_std"] = vae.latent_std.tolist()
        if training.dit.steps > 0:
            summary["dit"] = train_dit(dit, data, val_data, training.dit, training.seed,
                                       loss_log, progress, start=dit_start)
        summary["total_seconds"] = time.monotonic() - t0
        if out is not None:
            partial = out.with_name(f".{out.name}.partial-{os.getpid()}.safetensors")
            save_checkpoint(partial, vae, dit, model, dtype=save_dtype)
            os.replace(partial, out)  # no half-written weights under the final name
            summary["size_mb"] = out.stat().st_size / 1e6
        loss_log.write(stage="summary", **summary)
    return summary


# --- CLI --------------------------------------------------------------------------------------

def _cli():
    import click

    from runtime.errors import WanError, run_cli

    examples = """
\b
Examples:
  python -m export.train --preset small --out export/pretrained/small.safetensors
  python -m export.train --preset tiny --vae-steps 20 --dit-steps 20 --out /tmp/t.safetensors
  python -m export.train --init w.safetensors --vae-steps 0 --out w2.safetensors  # DiT only

The log (one JSON object per step, then a summary) is written next to --out as NAME.log.jsonl.
Each stage runs its step count unless its --minutes-* cap comes first (then the log says so).
"""

    @click.command(epilog=examples, context_settings={"help_option_names": ["-h", "--help"],
                                                      "max_content_width": 100})
    @click.option("--preset", default=None, help="Model preset to train (default small).")
    @click.option("--config", "config_path", type=click.Path(path_type=str),
                  help="Model config JSON (instead of --preset).")
    @click.option("--out", "-o", required=True, type=click.Path(path_type=str),
                  help="Weights to write (.safetensors).")
    @click.option("--init", type=click.Path(path_type=str), help="Start from these weights.")
    @click.option("--seed", default=0, show_default=True, help="Seeds init, data and noise.")
    @click.option("--vae-steps", type=click.IntRange(min=0), default=VAETraining.steps, show_default=True)
    @click.option("--dit-steps", type=click.IntRange(min=0), default=DiTTraining.steps, show_default=True)
    @click.option("--vae-batch", type=click.IntRange(min=1), default=VAETraining.batch, show_default=True)
    @click.option("--dit-batch", type=click.IntRange(min=1), default=DiTTraining.batch, show_default=True)
    @click.option("--minutes-vae", type=float, default=VAETraining.minutes, show_default=True,
                  help="Wall-clock cap of the VAE stage.")
    @click.option("--minutes-dit", type=float, default=DiTTraining.minutes, show_default=True,
                  help="Wall-clock cap of the DiT stage (clip encoding included).")
    @click.option("--dit-shift", type=click.FloatRange(min=0, min_open=True), default=DiTTraining.shift,
                  show_default=True, help="Sigma shift of the DiT's training noise levels (sampling "
                                          "uses the preset's own shift).")
    @click.option("--pool-clips", type=click.IntRange(min=1), default=DiTTraining.pool_clips,
                  show_default=True, help="Clips encoded once for DiT training.")
    @click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True,
                  help="torch CPU threads. The defaults' step counts were timed with 2 on a 2-core "
                       "machine. One thread is bit-reproducible but needs about 45 minutes: raise "
                       "--minutes-vae/--minutes-dit, or the caps end the stages early.")
    @click.option("--fp32", is_flag=True, help="Save float32 weights (default float16).")
    @click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
    @click.option("--debug", is_flag=True, help="Tracebacks.")
    def main(preset, config_path, out, init, seed, vae_steps, dit_steps, vae_batch, dit_batch,
             minutes_vae, minutes_dit, dit_shift, pool_clips, threads, fp32, quiet, debug):
        """Train the VAE and DiT from scratch on procedural clips; write safetensors weights."""
        from export.config import get_preset, load_config

        if preset and config_path:
            raise WanError("give --preset or --config, not both")
        if not out.endswith(".safetensors"):
            raise WanError(f"--out {out!r} must end in .safetensors")
        if vae_steps == 0 and init is None:
            raise WanError("--vae-steps 0 needs --init (an untrained VAE cannot encode the DiT's data)")
        model = load_config(config_path) if config_path else get_preset(preset or "small")
        if model.shape_only:
            raise WanError(f"preset {model.name!r} is for analytic projections only")
        torch.set_num_threads(threads)
        training = TrainingConfig(
            seed=seed,
            vae=dataclasses.replace(VAETraining(), steps=vae_steps, batch=vae_batch, minutes=minutes_vae),
            dit=dataclasses.replace(DiTTraining(), steps=dit_steps, batch=dit_batch, minutes=minutes_dit,
                                    shift=dit_shift, pool_clips=pool_clips),
            save_dtype="float32" if fp32 else "float16")
        s = train(model, training, out, init=init, progress=not quiet)
        parts = [f"wrote {out} ({s.get('size_mb', 0):.1f} MB) in {s['total_seconds'] / 60:.1f} min"]
        if "vae" in s:
            parts.append(f"VAE {s['vae']['steps']} steps, held-out PSNR "
                         f"{s['vae'].get('heldout_psnr_db', float('nan')):.1f} dB")
        if "dit" in s:
            parts.append(f"DiT {s['dit']['steps']} steps, val loss {s['dit']['val_loss']:.4f}")
        click.echo("; ".join(parts))

    return run_cli(main, "export.train")


if __name__ == "__main__":
    _cli()()
