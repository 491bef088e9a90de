"""Training on procedural clips: the generator, a few real training steps on the tiny preset,
and the quality metrics (export/synthetic.py, export/train.py, export/quality.py)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from export.config import PRESETS
from export.dit import WanDiT
from export.quality import (
    aligned_iou,
    foreground_mask,
    generate,
    identity,
    identity_report,
    psnr,
    reconstruct,
    vae_psnr,
    video_motion,
)
from export.rope import apply_rope, rope_tables
from export.synthetic import SHAPES, ClipSpec, clip_batch, clip_rng, make_clip, make_clips, random_crop
from export.train import (
    DiTTraining,
    TrainingConfig,
    VAETraining,
    flow_matching_loss,
    init_for_training,
    log_path_for,
    rail_masks,
    sample_sigmas,
    schedule,
    train,
)
from export.vae import WanVAE
from export.weights import build_models

SPEC = ClipSpec()  # 17 x 128 x 128, the small preset's clips


# --- the clip generator -----------------------------------------------------------------------

def test_clips_are_deterministic_per_seed_and_index():
    a, b = make_clips(7, 3, SPEC), make_clips(7, 3, SPEC)
    for x, y in zip(a, b):
        assert np.array_equal(x.frames, y.frames)
    # clip k is the same clip whatever batch it is drawn in
    assert np.array_equal(make_clips(7, 1, SPEC, start=2)[0].frames, a[2].frames)
    assert not np.array_equal(make_clips(8, 1, SPEC)[0].frames, a[0].frames)


def test_clip_shapes_reference_and_masks():
    clip = make_clip(clip_rng(0, 0, 0), SPEC)
    assert clip.frames.shape == (17, 128, 128, 3) and clip.frames.dtype == np.uint8
    assert clip.coverage.shape == (17, 128, 128) and clip.masks.dtype == bool
    assert np.array_equal(clip.reference, clip.frames[0])
    s = clip.subject
    assert s.shape in SHAPES and s.centres.shape == (17, 2)
    # outside the subject the frame is exactly the plain background
    assert np.all(clip.frames[clip.coverage == 0] == np.array(s.background, np.uint8))
    assert np.linalg.norm(np.subtract(s.colour, s.background)) >= SPEC.min_contrast
    d = clip.describe()
    assert d["shape"] == s.shape and d["masks"].shape == (17, 128, 128)
    drawn = clip.frames[0][clip.coverage[0] == 1].mean(0)  # fully covered pixels of frame 0
    assert np.linalg.norm(drawn - d["mean_colour"]) < 40  # (texture shares are only about half)
    batch = clip_batch(0, 2, SPEC)
    assert batch.shape == (2, 17, 128, 128, 3) and batch.dtype == np.uint8


def test_subject_moves_and_stays_in_frame():
    for clip in make_clips(3, 8, SPEC):
        centres = np.array([np.argwhere(m).mean(0) for m in clip.masks])  # (T, 2) y, x
        assert np.linalg.norm(centres[-1] - centres[0]) >= 0.8 * SPEC.travel[0] * 128 - 2
        assert all(m.any() for m in clip.masks)
        edge = clip.masks[:, [0, -1]].any() or clip.masks[:, :, [0, -1]].any()
        assert not edge, "the subject should stay inside the frame"


def test_random_crop_is_a_window_of_a_clip():
    crop = random_crop(clip_rng(0, 1, 5), SPEC, frames=9, size=32)
    assert crop.shape == (9, 32, 32, 3) and crop.dtype == np.uint8


# --- training ---------------------------------------------------------------------------------

TINY_TRAINING = TrainingConfig(
    seed=3,
    vae=dataclasses.replace(VAETraining(), steps=12, batch=2, warmup=2, eval_clips=2),
    dit=dataclasses.replace(DiTTraining(), steps=30, batch=4, warmup=3, pool_clips=8, val_clips=2,
                            val_every=10))


def train_on_one_thread(out):
    """One thread, as the CLI defaults to (the thread count changes float summation order);
    the session's setting is restored for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(PRESETS["tiny"], TINY_TRAINING, out, progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "tiny.safetensors"
    return out, train_on_one_thread(out)


def test_short_training_writes_a_loadable_checkpoint_and_log(tiny_run):
    out, summary = tiny_run
    vae, _ = build_models(PRESETS["tiny"], checkpoint=out)
    assert summary["vae"]["steps"] == 12 and summary["dit"]["steps"] == 30
    assert summary["vae"]["stopped_by"] == summary["dit"]["stopped_by"] == "steps"
    # latent statistics were fitted and shipped (fp16-exact, so loading changes nothing)
    assert torch.allclose(vae.latent_mean, torch.tensor(summary["latent_mean"]))
    assert not torch.all(vae.latent_std == 1)
    records = [json.loads(line) for line in log_path_for(out).read_text().splitlines()]
    assert [r["stage"] for r in records].count("vae") == 12
    assert [r["stage"] for r in records].count("dit") == 30
    assert records[-1]["stage"] == "summary"
    dit_loss = [r["loss"] for r in records if r["stage"] == "dit"]
    assert np.mean(dit_loss[-5:]) < np.mean(dit_loss[:5]), "the DiT loss should go down"
    # 12 steps with the decoder's latent noise: only a floor (measured 12.9 dB); the shipped
    # model's quality is checked in test_pretrained.py
    assert summary["vae"]["heldout_psnr_db"] > 11


def test_training_is_reproducible_from_the_seed(tiny_run, tmp_path):
    out, _ = tiny_run
    again = tmp_path / "again.safetensors"
    train_on_one_thread(again)
    from safetensors.torch import load_file

    a, b = load_file(out), load_file(again)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dit_is_given_the_clean_reference_as_frame_0():
    """The loss feeds the reference (or, dropped, zeros) as latent frame 0 and as the context,
    and scores frames 1.. only: a wild frame-0 output costs nothing."""
    gen = torch.Generator().manual_seed(0)
    x0, ref = torch.randn(4, 3, 3, 4, 4), torch.randn(4, 3, 1, 4, 4)
    motion = torch.randn(4, 3, 2, 3)
    still = torch.eye(2, 3).expand(4, 3, 2, 3)
    seen = {}

    def dit(x, t, context, maps):
        seen.update(x=x, context=context, maps=maps)
        out = torch.zeros_like(x)
        out[:, :, 0] = 1e3
        return out

    cases = ((0.0, 0.0, ref, motion), (1.0, 0.0, torch.zeros_like(ref), still), (0.0, 1.0, ref, still))
    for p_uncond, p_no_motion, given, maps in cases:
        loss = flow_matching_loss(dit, x0, ref, motion, 5.0, p_uncond, gen, p_no_motion)
        assert torch.equal(seen["x"][:, :, :1], given) and torch.equal(seen["context"], given)
        assert torch.equal(seen["maps"], maps)  # dropped: the identity motion (nothing moves)
        assert not torch.equal(seen["x"][:, :, 1:], x0[:, :, 1:])  # the rest is noised
        assert float(loss) < 10.0  # E[(noise - x0)^2] = 2 on frames 1..; frame 0 would add 1e6


def test_training_sigmas_are_stratified_and_use_the_training_shift(monkeypatch):
    """One sigma per stratum of the unshifted u; and the DiT stage shifts with
    `DiTTraining.shift`, not with the sampler's shift (they differ on purpose)."""
    sigma = sample_sigmas(8, 10.0, torch.Generator().manual_seed(0))
    u = sigma / (10.0 - 9.0 * sigma)  # the inverse of shift*u / (1 + (shift-1)*u)
    assert torch.equal(torch.sort(torch.floor(u * 8)).values, torch.arange(8.0))
    shifts = []

    def recording(batch, shift, gen):
        shifts.append(shift)
        return sample_sigmas(batch, shift, gen)

    monkeypatch.setattr("export.train.sample_sigmas", recording)
    cfg = PRESETS["tiny"]
    training = dataclasses.replace(TINY_TRAINING, vae=dataclasses.replace(TINY_TRAINING.vae, steps=0),
                                   dit=dataclasses.replace(TINY_TRAINING.dit, steps=2, pool_clips=2,
                                                           val_clips=1, val_every=0, shift=7.0))
    assert cfg.sampler.shift != 7.0
    train(cfg, training, None, progress=False)
    assert shifts and set(shifts) == {7.0}


def test_schedule_warms_up_anneals_and_respects_the_clock():
    lrs = [lr for _, lr in schedule(100, 10.0, 1.0, warmup=10, min_frac=0.1)]
    assert len(lrs) == 100
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1, abs=0.01) and max(lrs) == pytest.approx(1.0)
    assert list(schedule(100, 0.0, 1.0, warmup=10, min_frac=0.1)) == []  # no time: no steps


def test_vae_init_is_a_working_autoencoder_and_its_rail_is_frozen():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    vae, dit = WanVAE(cfg.vae).eval(), WanDiT(cfg.dit, cfg.vae.z_dim)
    init_for_training(vae, dit, 0)
    spec = ClipSpec(frames=9, height=64, width=64)
    assert vae_psnr(vae, seed=1, count=2, spec=spec)["mean_db"] > 20  # before any training
    masks = rail_masks(vae)
    assert masks and all(p.shape == m.shape for p, m in masks)


def test_dit_init_cross_attention_looks_at_its_own_position():
    cfg = PRESETS["small"].dit
    dit = WanDiT(cfg, 16)
    init_for_training(WanVAE(PRESETS["small"].vae), dit, 0)
    attn, grid = dit.blocks[0].attn2, (2, 8, 8)
    x, ctx = torch.randn(1, 128, cfg.dim), torch.randn(1, 64, cfg.dim)
    with torch.no_grad():
        q = apply_rope(attn.norm_q(attn.to_q(x)).unflatten(2, (attn.heads, -1)),
                       *rope_tables(grid, cfg.head_dim, cfg.rope_theta))
        k = apply_rope(attn.norm_k(attn.to_k(ctx)).unflatten(2, (attn.heads, -1)),
                       *rope_tables((1, *grid[1:]), cfg.head_dim, cfg.rope_theta))
    weights = torch.einsum("blhd,bmhd->bhlm", q, k).softmax(-1)[0, 0]  # (video tokens, ref tokens)
    for frame in range(2):
        own = weights[frame * 64:(frame + 1) * 64].diagonal()
        assert own.min() > 0.9


def test_cli_refuses_a_dit_only_run_without_weights(tmp_path):
    r = subprocess.run([sys.executable, "-m", "export.train", "--vae-steps", "0", "--out",
                        str(tmp_path / "w.safetensors")], capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "needs --init" in r.stderr


def test_cli_refuses_a_non_positive_training_shift(tmp_path):
    out = tmp_path / "w.safetensors"
    # (a timeout: without the range check this would start a real 27-minute training)
    r = subprocess.run([sys.executable, "-m", "export.train", "--dit-shift", "0", "--out", str(out)],
                       capture_output=True, text=True, check=False, timeout=120)
    assert r.returncode == 2 and "--dit-shift" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


# --- quality metrics --------------------------------------------------------------------------

def test_psnr_of_identical_videos_is_infinite():
    clip = make_clip(clip_rng(0, 0, 1), SPEC).frames
    assert psnr(clip, clip) == float("inf")
    noisy = np.clip(clip.astype(int) + np.random.default_rng(0).integers(-3, 4, clip.shape), 0, 255)
    assert 35 < psnr(clip, noisy) < 50


def test_segmentation_finds_the_subject():
    clip = make_clip(clip_rng(0, 0, 2), SPEC)
    for t in (0, 8, 16):
        assert aligned_iou(foreground_mask(clip.frames[t]), clip.masks[t]) > 0.9


def test_identity_ranks_the_true_reference_above_a_shuffled_one():
    clips = make_clips(5, 6, SPEC)
    videos, refs = [c.frames for c in clips], [c.reference for c in clips]
    report = identity_report(videos, refs)
    assert report["colour_error"]["own"] < 5 < report["colour_error"]["shuffled"]
    assert report["colour_error"]["wins"] == 1.0
    assert report["shape_iou"]["own"] > report["shape_iou"]["shuffled"]
    assert report["background_error"]["own"] == 0.0
    assert report["first_frame_psnr"]["own"] == float("inf") > report["first_frame_psnr"]["shuffled"]
    assert report["background_noise"] < 5
    assert report["motion_px"] > 10


def test_motion_of_a_still_video_is_zero():
    clip = make_clip(clip_rng(0, 0, 3), SPEC)
    still = np.repeat(clip.reference[None], 17, axis=0)
    assert video_motion(still)["motion_px"] == 0.0 and video_motion(still)["frame_change"] == 0.0
    assert identity(still, clip.reference).shape_iou == 1.0
    assert video_motion(clip.frames)["motion_px"] > 10


def test_restart_from_the_true_latent():
    """restart_sigma 0 runs no step (the clip comes back as the VAE's reconstruction of the
    truth), 1 is plain sampling from noise, and in between starts part-way down the schedule."""
    cfg = PRESETS["tiny"]
    vae, dit = build_models(cfg)
    v = cfg.video
    truths = clip_batch(3, 2, ClipSpec(frames=v.frames, height=v.height, width=v.width))
    refs = [c[0] for c in truths]
    with torch.no_grad():
        kept = generate(vae, dit, refs, cfg, truths=truths, restart_sigma=0.0)
        half = generate(vae, dit, refs, cfg, truths=truths, restart_sigma=0.7)  # sigmas 1, .94, .83, .63, 0
        from_noise = generate(vae, dit, refs, cfg, truths=truths, restart_sigma=1.0)
        plain = generate(vae, dit, refs, cfg)
    for got, truth in zip(kept, truths):
        assert np.abs(got.astype(int) - reconstruct(vae, truth).astype(int)).max() <= 1
    for a, b in zip(from_noise, plain):
        np.testing.assert_array_equal(a, b)
    for h, k, n in zip(half, kept, plain):
        assert not np.array_equal(h, k) and not np.array_equal(h, n)
