"""Runtime (ONNX Runtime, numpy solvers) against the PyTorch reference pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.pipeline import ReferencePipeline
from export.vae import VAEDecoderStage, VAEEncoderStage
from export.weights import build_models
from runtime import Pipeline
from runtime.backends import OnnxRuntimeBackend
from tests.conftest import psnr, tiny_config

PSNR_MIN_DB = 40.0  # decoded uint8 video, runtime vs PyTorch, same seed and noise


@pytest.mark.parametrize("solver,rescale", [("euler", 0.0), ("dpm++2m", 0.0), ("dpm++2m", 0.7)])
def test_end_to_end_psnr(exported, attention, solver, rescale, reference_image):
    pipe = Pipeline.from_dir(exported(attention))
    vae, dit = build_models(tiny_config(attention))
    req = pipe.check_request(frames=9, height=64, width=64, steps=6, solver=solver, seed=3,
                             guidance_rescale=rescale)
    noise = pipe.noise(req)

    got = pipe(reference_image, frames=9, height=64, width=64, steps=6, solver=solver,
               guidance_rescale=rescale, noise=noise)
    maps, _ = pipe.motion_maps(reference_image, req)  # the seed's random motion, as pipe() draws it
    assert not np.allclose(maps[1:], np.eye(2, 3))  # it moves
    want_video = ReferencePipeline(vae, dit).generate(reference_image, maps, noise, 6, req.guidance,
                                                      req.shift, solver, rescale)
    from export.pipeline import to_uint8

    want = to_uint8(want_video)
    assert got.shape == want.shape == (9, 64, 64, 3)
    assert psnr(got, want) >= PSNR_MIN_DB, psnr(got, want)
    # the comparison means something only if the video is not flat or saturated
    assert want.std() > 10 and (want == 255).mean() < 0.5 and (want == 0).mean() < 0.5


@pytest.mark.parametrize("frames,height,width", [(5, 48, 80), (13, 64, 32)])
def test_stages_at_other_sizes(tiny_dir, frames, height, width):
    """Frame counts and sizes other than the export shape run through the same graphs (the
    DiT's ONNX Runtime graph and its portable one)."""
    pipe = Pipeline.from_dir(tiny_dir)
    portable_dit = OnnxRuntimeBackend(tiny_dir, pipe.manifest, contrib_ops=False).stages["dit"]
    vae, dit = build_models(tiny_config())
    rng = np.random.default_rng(0)
    video = rng.uniform(-1, 1, (1, 3, frames, height, width)).astype(np.float32)
    with torch.no_grad():
        lat_ref = VAEEncoderStage(vae)(torch.from_numpy(video)).numpy()
        lat = pipe.stages["vae_encoder"](video=video)["latent"]
        assert lat.shape == (1, 4, 1 + (frames - 1) // 4, height // 8, width // 8)
        np.testing.assert_allclose(lat, lat_ref, atol=1e-4)

        x = np.concatenate([lat, lat * 0.5]).astype(np.float32)
        t = np.array([900.0, 100.0], np.float32)
        ref = np.repeat(lat[:, :, :1], 2, axis=0)
        motion = np.tile(np.eye(2, 3, dtype=np.float32), (2, lat.shape[2], 1, 1))  # (2, F, 2, 3)
        motion[0, :, :, 2] = np.linspace(0, 1.5, lat.shape[2])[:, None]  # item 0 moves down-right
        v_ref = dit(*(torch.from_numpy(a) for a in (x, t, ref, motion))).numpy()
        for dit_graph in (pipe.stages["dit"], portable_dit):
            v = dit_graph(latent=x, timestep=t, ref_latent=ref, motion=motion)["velocity"]
            np.testing.assert_allclose(v, v_ref, atol=1e-4)

        out_ref = VAEDecoderStage(vae)(torch.from_numpy(lat)).numpy()
        out = pipe.stages["vae_decoder"](latent=lat)["video"]
        assert out.shape == video.shape
        np.testing.assert_allclose(out, out_ref, atol=1e-4)


def test_streaming_decoder_matches_whole_clip(tiny_dir):
    """The runtime decodes frame by frame by default; against the whole-clip graph: >= 50 dB."""
    pipe = Pipeline.from_dir(tiny_dir)
    assert pipe.can_stream
    latent = np.random.default_rng(5).standard_normal((1, 4, 4, 6, 8)).astype(np.float32)
    chunks = [c.shape[2] for c in pipe.decode_stream(latent)]
    assert chunks == [1, 4, 4, 4]
    from runtime.pipeline import to_uint8

    streamed, whole = pipe.decode_video(latent, stream=True), pipe.decode_video(latent, stream=False)
    assert psnr(to_uint8(streamed), to_uint8(whole)) >= 50
