"""The bundled trained weights of the `small` preset: they match the preset, the VAE
reconstructs held-out clips, and generated clips keep their reference's identity and move.

Generation here is the PyTorch reference pipeline on clips of a seed and data stream training
never used (export/quality.py); the runtime's agreement with it is tested in test_parity.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from export.config import PRESETS
from export.quality import STREAM_HELDOUT, generate, identity_report, track_error, vae_psnr
from export.synthetic import ClipSpec, clip_batch, make_clips, motion_of
from export.weights import build_models, default_checkpoint

CFG = PRESETS["small"]
CLIPS = 4
# Bars of the motion test (10 steps, these 4 clips); measured: see README "The trained small model".
TRACK_MAX_PX = 6.0
SHAPE_IOU_MIN = 0.6


@pytest.fixture(scope="module")
def models():
    torch.set_grad_enabled(False)
    yield build_models(CFG)  # no checkpoint given: the bundled weights
    torch.set_grad_enabled(True)


def test_bundled_weights_match_the_preset():
    path = default_checkpoint(CFG)
    assert path.is_file() and path.stat().st_size <= 20e6  # the budget: 20 MB
    with safe_open(str(path), "pt") as f:
        trained = json.loads(f.metadata()["wan_config"])
    preset = json.loads(json.dumps(CFG.to_dict()))  # tuples as JSON lists, like the metadata
    for part in ("vae", "dit", "video"):
        assert trained[part] == preset[part], f"{part} changed since the weights were trained"


def test_vae_reconstructs_heldout_clips(models):
    vae, _ = models
    result = vae_psnr(vae, seed=1, count=8)  # 17x128x128 clips training never saw
    assert result["mean_db"] >= 28.0, result


def test_generated_clips_keep_identity_and_move(models):
    """Own reference vs a shuffled one (the next clip's): the generated frames must agree with
    their own reference's colours and shape far better, and the subject must travel."""
    vae, dit = models
    spec = ClipSpec(frames=CFG.video.frames, height=CFG.video.height, width=CFG.video.width)
    refs = [clip[0] for clip in clip_batch(1, CLIPS, spec, STREAM_HELDOUT)]
    videos = generate(vae, dit, refs, CFG, seed=1, steps=10)
    later = identity_report([v[1:] for v in videos], refs)  # frame 0 is the reference itself
    assert later["colour_error"]["wins"] == 1.0, later["colour_error"]
    assert later["colour_error"]["own"] < 0.6 * later["colour_error"]["shuffled"]
    assert later["shape_iou"]["own"] > later["shape_iou"]["shuffled"]
    # Most frames must show a subject. Not necessarily all: one of these clips (a thin striped
    # magenta cross on pink) shrinks to a dot; weights before the shipped ones lost it for 2 of
    # 64 frames here. The shipped ones (random motions from the seeds): 0 of 64, colour error 19
    # against 123 shuffled, IoU 0.76 / 0.41, travel 21 px.
    assert later["visible"] >= 0.9, later["visible"]
    assert np.mean([m["motion_px"] for m in identity_report(videos, refs)["per_clip"]]) >= 5.0


def test_generated_clips_follow_the_given_motion(models):
    """Given its true clip's motion, a generated clip follows the true subject closely; given the
    next clip's motion, it goes elsewhere: the motion input steers the video."""
    vae, dit = models
    spec = ClipSpec(frames=CFG.video.frames, height=CFG.video.height, width=CFG.video.width)
    clips = make_clips(1, CLIPS, spec, STREAM_HELDOUT)
    refs, truths = [c.reference for c in clips], [c.frames for c in clips]
    own = [motion_of(c.subject, spec) for c in clips]
    follow = generate(vae, dit, refs, CFG, seed=1, steps=10, motions=own)
    other = generate(vae, dit, refs, CFG, seed=1, steps=10, motions=own[1:] + own[:1])
    err_own, err_other = track_error(follow, truths), track_error(other, truths)
    assert err_own <= TRACK_MAX_PX and err_own < 0.5 * err_other, (err_own, err_other)
    assert identity_report([v[1:] for v in follow], refs)["shape_iou"]["own"] >= SHAPE_IOU_MIN
