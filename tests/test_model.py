"""The PyTorch reference model: shapes, causality, factorized attention, RoPE, weights."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from export.config import PRESETS, ModelConfig, load_config
from export.dit import Attention
from export.rope import apply_rope, axes_dims, rope_tables
from export.weights import build_models, load_checkpoint, save_checkpoint
from runtime.errors import WanError
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def tiny_models():
    return build_models(tiny_config())


@pytest.mark.parametrize("frames,latent_frames", [(1, 1), (5, 2), (9, 3), (17, 5)])
def test_vae_frame_counts(tiny_models, frames, latent_frames):
    vae, _ = tiny_models
    with torch.no_grad():
        z = vae.encode(torch.rand(1, 3, frames, 32, 48) * 2 - 1)
        assert z.shape == (1, 4, latent_frames, 4, 6)
        assert vae.decode(z).shape == (1, 3, frames, 32, 48)


def test_vae_is_causal(tiny_models):
    """Latent frame k sees only video frames <= 4k; decoded frames only earlier latents."""
    vae, _ = tiny_models
    x = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x)
        assert torch.allclose(vae.encode(x[:, :, :5]), z[:, :, :2], atol=1e-5)
        y = vae.decode(z)
        assert torch.allclose(vae.decode(z[:, :, :2]), y[:, :, :5], atol=1e-5)


def test_attention_factorization_is_local():
    """spatial: a change in frame 1 leaves frame 0 alone; temporal: a change at one (h, w)
    leaves every other position alone, across all frames."""
    cfg = tiny_config().dit
    attn = Attention(cfg).eval()
    T, H, W = 3, 2, 2
    rope = rope_tables((T, H, W), cfg.head_dim, cfg.rope_theta)
    x = torch.randn(1, T * H * W, cfg.dim)
    y = x.clone()
    y[:, H * W : 2 * H * W] += 1.0  # all tokens of frame 1
    z = x.clone()
    z[:, 0 :: H * W] += 1.0  # position (0, 0) in every frame
    with torch.no_grad():
        run = lambda inp, layout: attn(inp, inp, rope, rope, layout, (T, H, W))  # noqa: E731
        s_x, s_y = run(x, "spatial"), run(y, "spatial")
        assert torch.equal(s_x[:, : H * W], s_y[:, : H * W])
        assert not torch.allclose(s_x[:, H * W : 2 * H * W], s_y[:, H * W : 2 * H * W])
        t_x, t_z = run(x, "temporal"), run(z, "temporal")
        others = [i for i in range(T * H * W) if i % (H * W) != 0]
        assert torch.equal(t_x[:, others], t_z[:, others])
        f_x, f_z = run(x, "full"), run(z, "full")
        assert not torch.allclose(f_x[:, others], f_z[:, others])


def test_rope_is_relative():
    """q.k after rotation depends on the position offset only (the property RoPE exists for)."""
    d = 12
    assert axes_dims(d) == (4, 4, 4) and sum(axes_dims(128)) == 128
    cos, sin = rope_tables((4, 3, 3), d, 10000.0)
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)

    def score(i, j):
        qi = apply_rope(q.expand(1, 36, 1, d), cos, sin)[0, i, 0]
        kj = apply_rope(k.expand(1, 36, 1, d), cos, sin)[0, j, 0]
        return float(qi @ kj)

    idx = lambda t, h, w: t * 9 + h * 3 + w  # noqa: E731
    assert score(idx(0, 0, 0), idx(1, 1, 0)) == pytest.approx(score(idx(2, 1, 1), idx(3, 2, 1)), abs=1e-5)
    assert score(idx(0, 0, 0), idx(1, 1, 0)) != pytest.approx(score(idx(0, 0, 0), idx(1, 0, 1)), abs=1e-3)


@pytest.mark.parametrize("attention", ["factorized", "full"])
def test_dit_shapes_and_conditioning(attention):
    cfg = tiny_config(attention)
    _, dit = build_models(cfg)
    x, ref = torch.randn(2, 4, 3, 4, 6), torch.randn(2, 4, 1, 4, 6)
    t = torch.tensor([900.0, 10.0])
    still = torch.eye(2, 3).expand(2, 3, 2, 3)
    moved = still.clone()
    moved[:, 1:, 0, 2] = 1.0  # frames 1, 2: the reference one token to the right
    with torch.no_grad():
        v = dit(x, t, ref, moved)
        assert v.shape == x.shape
        assert not torch.allclose(v, dit(x, t, torch.zeros_like(ref), moved))  # the reference matters
        assert not torch.allclose(v, dit(x, t.flip(0), ref, moved))  # the timestep matters
        v_still = dit(x, t, ref, still)
        assert not torch.allclose(v, v_still)  # the motion matters


def test_identity_motion_keeps_every_reference_key_at_its_own_position():
    """With identity maps the reference keys get the RoPE of their own (0, h, w) in every frame,
    so a still subject is the plain reference cross-attention; a translation by (dx, dy) tokens
    gives each key the angles of the position it moved to."""
    from export.dit import reference_rope
    from export.rope import rope_tables

    cfg = tiny_config().dit
    grid = (3, 4, 6)
    own = rope_tables((1, 4, 6), cfg.head_dim, cfg.rope_theta)
    cos, sin = reference_rope(torch.eye(2, 3).expand(2, 3, 2, 3), grid, cfg.head_dim, cfg.rope_theta)
    assert cos.shape == (2 * 3, 24, cfg.head_dim // 2)
    torch.testing.assert_close(cos, own[0].expand_as(cos))
    torch.testing.assert_close(sin, own[1].expand_as(sin))
    shifted = torch.eye(2, 3).repeat(1, 3, 1, 1)
    shifted[0, 2, :, 2] = torch.tensor([2.0, 1.0])  # frame 2: two tokens right, one down
    cos, _ = reference_rope(shifted, grid, cfg.head_dim, cfg.rope_theta)
    big = rope_tables((1, 8, 10), cfg.head_dim, cfg.rope_theta)[0].view(8, 10, -1)
    torch.testing.assert_close(cos[2].view(4, 6, -1), big[1:5, 2:8])
    torch.testing.assert_close(cos[1], own[0])


def test_seeded_init_is_deterministic():
    a, b = build_models(tiny_config())[1], build_models(tiny_config())[1]
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_checkpoint_round_trip(tmp_path):
    cfg = tiny_config()
    vae, dit = build_models(cfg)
    with torch.no_grad():
        dit.proj_out.weight.mul_(2.0)
        vae.latent_std.fill_(0.7)
    path = tmp_path / "w.safetensors"
    save_checkpoint(path, vae, dit, cfg)
    vae2, dit2 = build_models(cfg, checkpoint=path)
    assert torch.equal(dit2.proj_out.weight, dit.proj_out.weight)
    assert torch.equal(vae2.latent_std, vae.latent_std)


def test_checkpoint_errors(tmp_path):
    cfg = tiny_config()
    vae, dit = build_models(cfg)
    with pytest.raises(WanError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors", vae, dit)
    pickle = tmp_path / "w.pt"
    pickle.write_bytes(b"\x80\x04not really")
    with pytest.raises(WanError, match="only safetensors"):
        load_checkpoint(pickle, vae, dit)
    corrupt = tmp_path / "bad.safetensors"
    corrupt.write_bytes(b"garbage")
    with pytest.raises(WanError, match="cannot be read"):
        load_checkpoint(corrupt, vae, dit)
    other = tmp_path / "other.safetensors"  # full attention has no temporal block
    full_vae, full_dit = build_models(tiny_config("full"))
    save_checkpoint(other, full_vae, full_dit, tiny_config("full"))
    with pytest.raises(WanError, match="missing dit"):
        load_checkpoint(other, vae, dit)


def test_shape_only_preset_is_never_built():
    cfg = PRESETS["wan2.2-5b"]
    assert cfg.geometry.pixels_per_token == (32, 32) and cfg.dit.head_dim == 128
    with pytest.raises(WanError, match="analytic"):
        build_models(cfg)


def test_config_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"preset": "tiny", "dit": {"num_layers": 3}}))
    cfg = load_config(path)
    assert cfg.dit.num_layers == 3 and cfg.vae == PRESETS["tiny"].vae
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    path.write_text(json.dumps({"preset": "tiny", "dit": {"layers": 3}}))
    with pytest.raises(WanError, match="unknown key"):
        load_config(path)
    path.write_text(json.dumps({"preset": "tiny", "video": {"height": 100}}))
    with pytest.raises(WanError, match="height 100"):
        load_config(path)
    path.write_text("{not json")
    with pytest.raises(WanError, match="not valid JSON"):
        load_config(path)
    bad = dataclasses.replace(PRESETS["tiny"], dit=dataclasses.replace(PRESETS["tiny"].dit, num_heads=5))
    with pytest.raises(WanError, match="divisible"):
        bad.validate()


def test_streaming_decode_matches_whole_clip(tiny_models):
    """Frame-by-frame decoding with a FrameCache reproduces the whole-clip decoder (no seams
    every 4 frames): chunk 0 gives 1 frame, every later latent frame 4."""
    from export.vae import FrameCache

    vae, _ = tiny_models
    z = torch.randn(1, 4, 4, 4, 6)
    with torch.no_grad():
        whole = vae.decode(z)
        cache, parts = None, []
        for k in range(4):
            cache = FrameCache(cache.outputs if cache else None)
            parts.append(vae.decode(z[:, :, k : k + 1], cache))
    assert [p.shape[2] for p in parts] == [1, 4, 4, 4]
    assert torch.allclose(torch.cat(parts, dim=2), whole, atol=1e-5)


BAD_CONFIGS = {
    "dim a word": ({"dit": {"dim": "big"}}, 'config.dit.dim must be a whole number, got "big"'),
    "dim a float": ({"dit": {"dim": 1e9}}, "config.dit.dim must be a whole number, got 1000000000.0"),
    "no heads": ({"dit": {"num_heads": 0}}, "dit.num_heads 0 must be from 1 to dit.dim"),
    "dim_mult a number": ({"vae": {"dim_mult": 5}}, "config.vae.dim_mult must be a list, got 5"),
    "zero patch": ({"dit": {"patch_size": [1, 0, 0]}}, "dit.patch_size [1, 0, 0] entries must be from 1 to 8"),
    "short patch": ({"dit": {"patch_size": [1, 2]}}, "must have 3 entries"),
    "zero base_dim": ({"vae": {"base_dim": 0}}, "vae.base_dim 0 must be from 1"),
    "negative layers": ({"dit": {"num_layers": -1}}, "dit.num_layers -1 must be from 1 to 1024"),
    "bool layers": ({"dit": {"num_layers": True}}, "must be a whole number, got true"),
    "negative steps": ({"sampler": {"steps": -5}}, "sampler steps -5 is not allowed"),
    "zero fps": ({"sampler": {"fps": 0}}, "sampler fps 0 is not allowed"),
    "negative shift": ({"sampler": {"shift": -1}}, "sampler shift -1.0 is not allowed"),
    "unknown solver": ({"sampler": {"solver": "rk4"}}, "sampler solver 'rk4' is not allowed"),
    "frames not 4n+1": ({"video": {"frames": 8}}, "video.frames 8 must be 4n+1"),
    "default above max": ({"video": {"frames": 69}}, "must fit within video.max_frames"),
    "preset not a name": ({"preset": 3}, "preset must be a preset name"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_one_line_before_anything_is_built(case, tmp_path):
    over, needle = BAD_CONFIGS[case]
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"preset": "tiny", **over}))
    with pytest.raises(WanError) as err:
        load_config(path)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_config_too_big_for_this_machine_is_refused_before_allocating(tmp_path):
    from export.build import build_artifacts

    cfg = dataclasses.replace(PRESETS["tiny"], dit=dataclasses.replace(
        PRESETS["tiny"].dit, dim=60000, num_heads=10000, ffn_dim=240000))  # ~100B parameters
    with pytest.raises(WanError, match=r"M parameters: exporting it needs about .* GiB, and .* GiB is available"):
        build_artifacts(cfg, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_bad_config_through_the_cli(tmp_path):
    from tests.conftest import run_cli

    (tmp_path / "c.json").write_text(json.dumps({"preset": "tiny", "dit": {"num_layers": -1}}))
    r = run_cli("wan-export", "--config", tmp_path / "c.json", "--out", tmp_path / "out")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "num_layers -1" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]
