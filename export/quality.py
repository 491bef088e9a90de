"""Measuring a trained model: VAE reconstruction and identity preservation of generated clips.

Everything below `psnr` works on uint8 videos (T, H, W, 3), from `runtime.Pipeline` or from
`export.pipeline.ReferencePipeline` + `to_uint8`, and needs no ground truth beyond the
reference image: the scenes are one subject over a plain background (export/synthetic.py), so
the background is the median colour of the frame border and the subject is every pixel far
enough from it. The metrics need numpy only (torch is imported by the functions that run the
models), so they also serve a torch-free runtime install.

Identity metrics compare a generated clip with its own reference and, as a baseline, with the
reference of a different clip (`shuffled`): a model that ignores its reference scores about the
same on both, one that keeps colour and shape scores clearly better on its own.

    colour_error      RGB distance between the subject's mean colour in each frame and in the
                      reference (0..441, lower is better)
    shape_iou         IoU of each frame's subject mask with the reference's, after moving the
                      mask's centroid onto the reference's (higher is better)
    background_error  RGB distance between the frame's and the reference's background colour
    background_noise  RMS deviation of the background pixels from their colour (a plain
                      background: 0; noise left by the sampler or decoder shows here)
    first_frame_psnr  frame 0 against the reference image (the clip should start from it)
    motion_px         largest centroid distance from frame 0's centroid (pixels)
    track_px          (`evaluate`, with each clip's true motion given) mean centroid distance
                      from the true clip's subject, frame by frame: is the given motion followed

    python -m export.quality --clips 8                      # the bundled small weights
    python -m export.quality --checkpoint w.safetensors --preset small --clips 8
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from export.synthetic import ClipSpec, clip_batch, make_clips, motion_of
from runtime.motion import background_colour, centroid, foreground_mask  # noqa: F401 - re-exported

STREAM_HELDOUT = 9  # synthetic.clip_rng stream of the clips measured here; training uses 1..3


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB of two uint8 (or [0, 255] float) arrays; inf when identical."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(peak**2 / mse))


# --- VAE reconstruction -----------------------------------------------------------------------

def reconstruct(vae, frames: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) -> the VAE's reconstruction, uint8 (T, H, W, 3)."""
    import torch

    from export.pipeline import to_uint8, to_unit

    with torch.no_grad():
        return to_uint8(vae.decode(vae.encode(to_unit(frames))))


def vae_psnr(vae, seed: int = 1, count: int = 8, spec: ClipSpec | None = None,
             stream: int = STREAM_HELDOUT) -> dict:
    """Reconstruction PSNR over `count` synthetic clips (default spec: 17x128x128) that
    training never saw (by default: another seed and another stream than the training data)."""
    clips = clip_batch(seed, count, spec or ClipSpec(), stream)
    per_clip = [psnr(c, reconstruct(vae, c)) for c in clips]
    return {"mean_db": float(np.mean(per_clip)), "min_db": float(np.min(per_clip)), "per_clip_db": per_clip}


# --- segmentation of one-subject frames -------------------------------------------------------

def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Move a mask by whole pixels, filling with False (no wrap-around, unlike np.roll)."""
    H, W = mask.shape
    out = np.zeros_like(mask)
    ys, yd = (slice(0, H - dy), slice(dy, H)) if dy >= 0 else (slice(-dy, H), slice(0, H + dy))
    xs, xd = (slice(0, W - dx), slice(dx, W)) if dx >= 0 else (slice(-dx, W), slice(0, W + dx))
    out[yd, xd] = mask[ys, xs]
    return out


def aligned_iou(mask: np.ndarray, reference: np.ndarray) -> float:
    """IoU of `mask` with `reference` after moving mask's centroid onto reference's: shape
    agreement regardless of where the subject has travelled. 0 if either is empty."""
    if not mask.any() or not reference.any():
        return 0.0
    dy, dx = np.rint(centroid(reference) - centroid(mask)).astype(int)
    moved = _shift(mask, int(dy), int(dx))
    union = np.logical_or(moved, reference).sum()
    return float(np.logical_and(moved, reference).sum() / union)


# --- identity and motion ----------------------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    """One generated video against one reference image (see the module docstring)."""

    colour_error: float
    shape_iou: float
    background_error: float
    background_noise: float  # RMS deviation of background pixels from the background colour
    first_frame_psnr: float  # frame 0 against the reference image itself (dB)
    motion_px: float
    visible: float  # fraction of frames with a subject at all


def identity(video: np.ndarray, reference: np.ndarray) -> Identity:
    """video uint8 (T, H, W, 3), reference uint8 (H, W, 3)."""
    ref_bg = background_colour(reference)
    ref_mask = foreground_mask(reference, ref_bg)
    ref_colour = reference[ref_mask].mean(0) if ref_mask.any() else ref_bg
    colour_err, ious, bg_err, bg_noise, centres, visible = [], [], [], [], [], []
    for frame in video:
        bg = background_colour(frame)
        mask = foreground_mask(frame, bg)
        if not mask.all():
            bg_noise.append(np.sqrt(np.mean((frame[~mask].astype(np.float64) - bg) ** 2)))
        # An empty frame has lost the subject: count its colour as the background's.
        colour = frame[mask].mean(0) if mask.any() else bg
        colour_err.append(np.linalg.norm(colour - ref_colour))
        ious.append(aligned_iou(mask, ref_mask))
        bg_err.append(np.linalg.norm(bg - ref_bg))
        centres.append(centroid(mask))
        visible.append(mask.any())
    return Identity(float(np.mean(colour_err)), float(np.mean(ious)), float(np.mean(bg_err)),
                    float(np.mean(bg_noise)) if bg_noise else float("nan"), psnr(video[0], reference),
                    motion_px(np.array(centres)), float(np.mean(visible)))


def motion_px(centres: np.ndarray) -> float:
    """Largest distance of a (T, 2) centroid track from its first point; NaN rows (no
    subject) are skipped; 0 if frame 0 has no subject."""
    if np.isnan(centres[0]).any():
        return 0.0
    d = np.linalg.norm(centres - centres[0], axis=1)
    return float(np.nanmax(d)) if np.isfinite(d).any() else 0.0


def video_motion(video: np.ndarray) -> dict:
    """How much a video moves: centroid track of its subject and mean frame change."""
    centres = np.array([centroid(foreground_mask(f)) for f in video])
    v = np.asarray(video, np.float64)
    return {"motion_px": motion_px(centres),
            "frame_change": float(np.mean(np.abs(v[1:] - v[:-1]))),  # mean |frame t+1 - frame t|
            "centroids": centres.tolist()}


def identity_report(videos, references) -> dict:
    """Identity metrics of each video against its own reference and against the next clip's
    reference (a fixed derangement: the shuffled baseline). `wins`: how often the own
    reference scores better than the shuffled one."""
    n = len(videos)
    if n < 2:
        raise ValueError("identity_report needs at least 2 videos for the shuffled baseline")
    own = [identity(v, r) for v, r in zip(videos, references)]
    shuffled = [identity(videos[i], references[(i + 1) % n]) for i in range(n)]
    report = {}
    for name, better in (("colour_error", np.less), ("shape_iou", np.greater),
                         ("background_error", np.less), ("first_frame_psnr", np.greater)):
        a = np.array([getattr(m, name) for m in own])
        b = np.array([getattr(m, name) for m in shuffled])
        report[name] = {"own": float(a.mean()), "shuffled": float(b.mean()),
                        "wins": float(np.mean(better(a, b)))}
    report["motion_px"] = float(np.mean([m.motion_px for m in own]))
    report["background_noise"] = float(np.nanmean([m.background_noise for m in own]))
    report["visible"] = float(np.mean([m.visible for m in own]))
    report["per_clip"] = [asdict(m) for m in own]
    return report


# --- generation for measurement ---------------------------------------------------------------

def generate(vae, dit, references, cfg, seed: int = 0, steps: int | None = None,
             guidance: float | None = None, solver: str | None = None, truths=None,
             restart_sigma: float = 1.0, guidance_rescale: float | None = None,
             motions=None) -> list[np.ndarray]:
    """One video per reference image with the PyTorch reference pipeline and `cfg`'s sampler
    defaults (what wan-run does with the exported model). Noise: seed + clip index.

    `motions`: one `runtime.motion.Motion` per reference (None, or None for a clip: a random
    motion drawn from the clip's seed, as wan-run does without one).

    `truths` (one uint8 clip per reference) with `restart_sigma` < 1: each clip starts from its
    own true latent noised to the first scheduled sigma <= restart_sigma instead of from pure
    noise. How much of a given layout the DiT keeps from each noise level shows where it loses
    the subject's shape (README, "Where the shape is lost")."""
    import torch

    from export.pipeline import ReferencePipeline, to_uint8, to_unit
    from runtime.motion import image_motion_maps

    s, v, g = cfg.sampler, cfg.video, cfg.geometry
    pipe = ReferencePipeline(vae, dit)
    shape = (1, g.latent_channels, g.frames_to_latent(v.frames), v.height // g.spatial_stride,
             v.width // g.spatial_stride)
    videos = []
    for i, ref in enumerate(references):
        noise = np.random.default_rng(seed + i).standard_normal(shape).astype(np.float32)
        motion = None if motions is None else motions[i]
        maps, _ = image_motion_maps(ref, motion, seed + i, v.frames, g)
        with torch.no_grad():
            start = vae.encode(to_unit(truths[i])) if truths is not None and restart_sigma < 1.0 else None
            video = pipe.generate(ref, maps, noise, steps or s.steps,
                                  s.guidance if guidance is None else guidance, s.shift, solver or s.solver,
                                  s.guidance_rescale if guidance_rescale is None else guidance_rescale,
                                  start, restart_sigma)
        videos.append(to_uint8(video))
    return videos


def track_error(videos, truths) -> float:
    """Mean distance (pixels) between the subject's centroid in each generated frame and in the
    same frame of the true clip: how closely the video follows the motion it was given. Frames
    where either has no subject are skipped."""
    d = [np.linalg.norm(centroid(foreground_mask(a)) - centroid(foreground_mask(b)))
         for video, truth in zip(videos, truths) for a, b in zip(video, truth)]
    return float(np.nanmean(d))


def evaluate(vae, dit, cfg, seed: int = 1, clips: int = 8, steps: int | None = None,
             guidance: float | None = None, restart_sigma: float = 1.0,
             guidance_rescale: float | None = None, own_motion: bool = True) -> dict:
    """Held-out VAE PSNR, and identity + motion of clips generated from held-out references,
    with the same metrics on the ground-truth clips for scale. Identity is measured on frames
    1.. only: frame 0 is the reference by construction (the DiT is given it), so its
    `first_frame_psnr` is that of frame 1. Each clip is generated with its true clip's motion
    (`own_motion`, so the track error says how well it is followed), else with a random one
    drawn from its seed. `restart_sigma` < 1: see `generate`. None for steps, guidance or
    guidance_rescale: the preset's."""
    spec = ClipSpec(frames=cfg.video.frames, height=cfg.video.height, width=cfg.video.width)
    held_out = make_clips(seed, clips, spec, STREAM_HELDOUT)
    truth = [c.frames for c in held_out]
    refs = [c[0] for c in truth]
    motions = [motion_of(c.subject, spec) for c in held_out] if own_motion else None
    videos = generate(vae, dit, refs, cfg, seed=seed, steps=steps, guidance=guidance, truths=truth,
                      restart_sigma=restart_sigma, guidance_rescale=guidance_rescale, motions=motions)
    def summary(report: dict) -> dict:
        return {k: v for k, v in report.items() if k != "per_clip"}

    generated = summary(identity_report([v[1:] for v in videos], refs))
    if own_motion:
        generated["track_px"] = track_error([v[1:] for v in videos], [t[1:] for t in truth])
    return {"vae_psnr_db": vae_psnr(vae, seed, clips, spec)["mean_db"],
            "generated": generated,
            "ground_truth": summary(identity_report([c[1:] for c in truth], refs)),
            "videos": videos}


def _cli():
    import json

    import click

    from runtime.errors import WanError, run_cli

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--checkpoint", type=click.Path(path_type=str),
                  help="Weights (.safetensors); default: the preset's bundled weights.")
    @click.option("--preset", default=None, help="Model preset of the checkpoint (default small).")
    @click.option("--config", "config_path", type=click.Path(path_type=str),
                  help="Model config JSON of the checkpoint (instead of --preset).")
    @click.option("--clips", default=8, show_default=True, help="Held-out clips to generate.")
    @click.option("--seed", default=1, show_default=True)
    @click.option("--steps", type=int, default=None, help="Sampling steps (default: the preset's).")
    @click.option("--guidance", type=float, default=None, help="CFG scale (default: the preset's).")
    @click.option("--guidance-rescale", type=click.FloatRange(0.0, 1.0), default=None,
                  help="Guidance rescale, 0 (plain CFG) to 1 (default: the preset's).")
    @click.option("--restart-sigma", type=click.FloatRange(0.0, 1.0), default=1.0, show_default=True,
                  help="Start each clip from its true latent noised to the first scheduled sigma <= "
                       "this, instead of from pure noise (1): which noise levels lose the shape.")
    @click.option("--random-motion", is_flag=True, help="Give each clip a random motion drawn from its "
                  "seed (as wan-run does without a motion) instead of its true clip's motion.")
    @click.option("--save", type=click.Path(path_type=str), help="Write the generated clips here "
                  "(one PNG strip per clip: reference, then frames).")
    @click.option("--debug", is_flag=True)
    def main(checkpoint, preset, config_path, clips, seed, steps, guidance, guidance_rescale, restart_sigma,
             random_motion, save, debug):
        """Measure a checkpoint on held-out synthetic clips; print JSON."""
        import torch

        from export.config import get_preset, load_config
        from export.weights import build_models

        if clips < 2:
            raise WanError("--clips must be >= 2 (the shuffled baseline needs another clip)")
        if preset and config_path:
            raise WanError("give --preset or --config, not both")
        torch.set_grad_enabled(False)
        cfg = load_config(config_path) if config_path else get_preset(preset or "small")
        vae, dit = build_models(cfg, checkpoint=checkpoint)
        result = evaluate(vae, dit, cfg, seed=seed, clips=clips, steps=steps, guidance=guidance,
                          restart_sigma=restart_sigma, guidance_rescale=guidance_rescale,
                          own_motion=not random_motion)
        videos = result.pop("videos")
        if save:
            from pathlib import Path

            from PIL import Image

            spec = ClipSpec(frames=cfg.video.frames, height=cfg.video.height, width=cfg.video.width)
            refs = [c[0] for c in clip_batch(seed, clips, spec, STREAM_HELDOUT)]
            Path(save).mkdir(parents=True, exist_ok=True)
            for i, (ref, video) in enumerate(zip(refs, videos)):
                strip = np.concatenate([ref, *video], axis=1)  # (H, (1 + T) * W, 3)
                Image.fromarray(strip).save(Path(save) / f"clip{i:02d}.png")
        click.echo(json.dumps(result, indent=2))

    return run_cli(main, "export.quality")


if __name__ == "__main__":
    _cli()()
