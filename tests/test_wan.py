"""Released Wan models (the `wan` family): tiny pipelines in diffusers' layout, exported with
`wan-export --model`, against diffusers' own pipelines on the same initial latent."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from engines.quality import psnr
from runtime import Pipeline
from runtime.manifest import load_manifest
from tests.conftest import run_cli
from tests.test_cli import one_line_error
from tests.wan_tiny import NEGATIVE, PROMPT, diffusers_video

SAMPLING = dict(frames=9, steps=4, guidance=5.0)


def compare(artifacts, folder, size: int, **extra):
    """(runtime frames uint8, diffusers frames as 0..255 floats) for the same request and noise."""
    pipe = Pipeline.from_dir(artifacts)
    kw = dict(SAMPLING, height=size, width=size, **{k: v for k, v in extra.items() if k in ("image", "scheduler")})
    req = pipe.check_request(prompt=PROMPT, negative_prompt=NEGATIVE, image=kw.get("image"),
                             **{k: kw[k] for k in ("frames", "height", "width", "steps", "guidance")})
    noise = np.asarray(pipe.noise(req))
    ours = pipe.generate(prompt=PROMPT, negative_prompt=NEGATIVE, noise=noise, **kw).frames
    ref = diffusers_video(folder, noise, image=extra.get("image"), scheduler=extra.get("scheduler"),
                          prompt=PROMPT, negative_prompt=NEGATIVE, height=size, width=size, num_frames=9,
                          num_inference_steps=4, guidance_scale=5.0)
    return ours, ref * 255.0


@pytest.mark.parametrize("case", ["wan2.1 unipc", "wan2.1 euler", "ti2v text", "ti2v image"])
def test_video_matches_diffusers(case, wan_artifacts, wan_folder):
    """The acceptance test: PSNR >= 40 dB against diffusers (measured 58.9 dB for all four: the
    runtime's video differs from diffusers' by uint8 rounding, at most 0.5 of 255)."""
    version = "wan2.1" if case.startswith("wan2.1") else "wan2.2"
    size = 32 if version == "wan2.1" else 64
    extra = {}
    if case.endswith("euler"):
        extra["scheduler"] = "euler"
    if case.endswith("image"):
        extra["image"] = (np.random.default_rng(1).random((size, size, 3)) * 255).astype(np.uint8)
    ours, ref = compare(wan_artifacts(version), wan_folder(version), size, **extra)
    assert ours.shape == ref.shape == (9, size, size, 3)
    assert psnr(ours, ref) >= 40.0, psnr(ours, ref)
    assert np.abs(ours - ref).max() <= 1.0  # rounding only


def test_every_stage_validated_against_pytorch(wan_artifacts):
    for version, stages in (("wan2.1", {"text_encoder", "dit", "vae_decoder_first", "vae_decoder_step"}),
                            ("wan2.2", {"text_encoder", "vae_encoder", "dit", "vae_decoder_first",
                                        "vae_decoder_step"})):
        m = load_manifest(wan_artifacts(version))
        assert m.family == "wan" and set(m.stages) == stages
        for name, stage in m.stages.items():
            v = stage.artifacts["fp32"].validation
            assert v["passed"] and v["max_rel"] <= 1e-4, (name, v)
            assert len(v["shapes"]) == 2  # two shapes, one of them a 1-frame video
    ti2v = load_manifest(wan_artifacts("wan2.2"))
    timestep = next(t for t in ti2v.stages["dit"].spec.inputs if t.name == "timestep")
    assert [str(d) for d in timestep.dims] == ["B", "F", "Hp", "Wp"]  # per token
    assert ti2v.geometry.pixels_per_token == (32, 32) and ti2v.geometry.latent_channels == 48


@pytest.mark.parametrize("frames", [5, 13])
def test_streaming_decoder_matches_diffusers_vae_at_other_lengths(frames, wan_artifacts, wan_folder):
    """diffusers' VAE decoder does not export with dynamic frames; the first/step graphs with
    explicit caches do, at any length (the parity tests decode 9 frames)."""
    import torch
    from diffusers import AutoencoderKLWan

    for version, size in (("wan2.1", 32), ("wan2.2", 64)):
        pipe = Pipeline.from_dir(wan_artifacts(version))
        vae = AutoencoderKLWan.from_pretrained(wan_folder(version) / "vae").eval()
        latent = np.random.default_rng(frames).standard_normal(pipe.latent_shape(frames, size, size), dtype=np.float32)
        ours = pipe.decode_video(latent)
        z = torch.from_numpy(latent)
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        with torch.no_grad():
            ref = vae.decode(z * std + mean, return_dict=False)[0].numpy()
        assert ours.shape == ref.shape == (1, 3, frames, size, size)
        assert np.abs(ours - ref).max() < 1e-4


def test_prompt_embeddings_match_the_pipeline(wan_artifacts, wan_folder):
    """Tokenizer (tokenizers, from tokenizer.json) + cleaning + text_encoder stage = diffusers'
    encode_prompt, trimming and zero-padding to 512 included."""
    import torch
    from diffusers import WanPipeline

    pipe = Pipeline.from_dir(wan_artifacts("wan2.1"))
    ref = WanPipeline.from_pretrained(wan_folder("wan2.1"))
    prompts = ["dance monkey", "  a cat &amp; a dog\n runs  ", "x" * 3000]
    for prompt in prompts:
        req = pipe.check_request(prompt=prompt, negative_prompt="", guidance=5.0)
        ours = np.asarray(pipe.encode_text(req))
        with torch.no_grad():
            want = ref.encode_prompt(prompt, "", max_sequence_length=512, device="cpu")
        np.testing.assert_allclose(ours[0], want[0][0].numpy(), atol=1e-5)
        np.testing.assert_allclose(ours[1], want[1][0].numpy(), atol=1e-5)


def test_wan_run_cli(wan_artifacts, tmp_path):
    art = wan_artifacts("wan2.2")
    image = tmp_path / "first.png"
    from PIL import Image

    Image.new("RGB", (80, 48), (200, 40, 40)).save(image)  # resized to the video size
    out = tmp_path / "clip.mp4"
    r = run_cli("wan-run", art, "--prompt", PROMPT, "--image", image, "--frames", 5, "--height", 64,
                "--width", 64, "--steps", 2, "-o", out)
    assert r.returncode == 0, r.stderr
    assert "UniPCMultistepScheduler, shift 3, guidance 5" in r.stdout and "encode (text, image)" in r.stdout
    from runtime.media import read_video

    assert read_video(out).shape == (5, 64, 64, 3)
    bad = {
        "no prompt": ([], "give --prompt"),
        "size not a multiple of 32": (["--prompt", "x", "--height", 48], "height 48", "multiple of 32"),
        "frames not 4n+1": (["--prompt", "x", "--frames", 6], "frames 6", "4n+1"),
        "seed-only option": (["--prompt", "x", "--move", "0.1,0"], "--move does not apply"),
        "unknown scheduler": (["--prompt", "x", "--scheduler", "ddim"], "ddim"),
        "guidance out of range": (["--prompt", "x", "--guidance", "1e9"], "guidance 1000000000.0"),
        "precision not built": (["--prompt", "x", "--precision", "int8"], "'int8' was not built"),
    }
    for args, *needles in bad.values():
        one_line_error(run_cli("wan-run", art, *args, "-o", tmp_path / "bad.mp4"), *needles)
    one_line_error(run_cli("wan-run", wan_artifacts("wan2.1"), "--prompt", "x", "--image", image, "-o",
                           tmp_path / "bad.mp4"), "takes no image")
    assert not (tmp_path / "bad.mp4").exists()


def test_wan_export_progress_and_listing(wan_artifacts):
    wan_artifacts("wan2.1")
    r = wan_artifacts.result("wan2.1")
    assert "[4/4]" in r.stderr and "manifest sha256" in r.stdout
    r = run_cli("wan-export", "--list-models")
    assert r.returncode == 0 and "Wan-AI/Wan2.2-TI2V-5B-Diffusers" in r.stdout and "not yet" in r.stdout


def edited(folder, tmp_path, change):
    """A copy of a tiny pipeline folder with `change(copy)` applied."""
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    change(copy)
    return copy


def set_json(path, **values):
    data = json.loads(path.read_text())
    data.update(values)
    path.write_text(json.dumps(data))


BAD_FOLDERS = {
    "no model_index": (lambda d: (d / "model_index.json").unlink(), "has no model_index.json"),
    "other pipeline": (lambda d: set_json(d / "model_index.json", _class_name="FluxPipeline"), "'FluxPipeline'"),
    "two experts": (lambda d: set_json(d / "model_index.json", boundary_ratio=0.875), "two-expert"),
    "clip image encoder": (lambda d: set_json(d / "model_index.json", image_encoder=["transformers", "CLIPVisionModel"]),
                           "CLIP image embeddings"),
    "missing component": (lambda d: shutil.rmtree(d / "vae"), "no vae/ folder"),
    "pickle weights": (lambda d: (d / "vae" / "diffusion_pytorch_model.safetensors").rename(
        d / "vae" / "diffusion_pytorch_model.bin"), "pickle file", "-Diffusers"),
    "missing shard": (lambda d: (d / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "diffusion_pytorch_model-00002-of-00002.safetensors"}})), "shard", "is missing"),
    "text_dim mismatch": (lambda d: set_json(d / "transformer" / "config.json", text_dim=64), "text_dim 64"),
    "unsupported scheduler": (lambda d: set_json(d / "scheduler" / "scheduler_config.json",
                                                 _class_name="DDIMScheduler"), "DDIMScheduler"),
    "no tokenizer.json": (lambda d: (d / "tokenizer" / "tokenizer.json").unlink(), "no tokenizer.json"),
    "weights not of the config's shape": (lambda d: set_json(d / "transformer" / "config.json", ffn_dim=48),
                                          "does not load with its config.json", "expected shape"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_wan_export_refuses_bad_folders(case, wan_folder, tmp_path):
    """Checked from the JSON files and file names before any weight is loaded (the last case,
    weights of another shape than the config says, when the component loads)."""
    from export.wan.build import build_wan_artifacts
    from runtime.errors import WanError

    change, *needles = BAD_FOLDERS[case]
    folder = edited(wan_folder("wan2.1"), tmp_path, change)
    with pytest.raises(WanError) as err:
        build_wan_artifacts(folder, tmp_path / "out")
    assert all(n in str(err.value) for n in needles) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists()


def test_wan_export_refusal_through_the_cli(wan_folder, tmp_path):
    folder = edited(wan_folder("wan2.1"), tmp_path, BAD_FOLDERS["two experts"][0])
    one_line_error(run_cli("wan-export", "--model", folder, "--out", tmp_path / "out"), "two-expert")
    one_line_error(run_cli("wan-export", "--model", folder, "--preset", "tiny", "--out", tmp_path / "out"),
                   "--preset", "belongs to the project's own model")
    assert not (tmp_path / "out").exists()


def test_reduced_precisions_and_engines(wan_artifacts):
    """fp16 (text encoder and DiT, measured-range fp32 islands) and int8 (DiT) from calibration on
    the fp32 runtime's own trajectories; the VAE stays fp32; TensorRT engines for every stage
    and precision (tensorrt-rtx builds them without a GPU). Measured: fp16 55.5 dB, int8 49.3 dB."""
    from tests.conftest import HAVE_TRT_BUILDER

    m = load_manifest(wan_artifacts("wan2.1"))
    assert m.precisions() == ["fp32", "fp16", "int8"]
    assert m.quality["fp16"]["psnr_db"] >= 40 and m.quality["int8"]["psnr_db"] >= 30
    assert set(m.quality["int8"]["stage_max_rel"]) == {"dit"}
    assert m.stages["dit"].artifacts["int8"].details["quantized_nodes"] > 0
    assert m.stages["text_encoder"].artifacts["fp16"].path == "onnx/fp16/text_encoder.onnx"
    assert m.stages["text_encoder"].artifacts["int8"].details["kept"] == "fp32"
    assert all(m.stages[n].artifacts[p].details["kept"] == "fp32"
               for n in ("vae_decoder_first", "vae_decoder_step") for p in ("fp16", "int8"))
    assert m.calibration["dit_calls"] > 0 and m.calibration["source"].startswith("the fp32 runtime")
    for p in ("fp32", "int8"):  # the step's ONNX Runtime graph (fused attention) beside the portable one
        g = m.stages["dit"].artifacts[p].ort_graph
        assert g["ops"] == ["com.microsoft.MultiHeadAttention"] and g["path"] in m.files
        assert g["validation"]["max_rel"] < (1e-4 if p == "fp32" else 0.05)
    assert m.stages["dit"].artifacts["fp16"].ort_graph is None
    if HAVE_TRT_BUILDER:
        for name, stage in m.stages.items():
            for p, art in stage.artifacts.items():
                assert art.engine is not None and art.engine["path"] in m.files, (name, p)
        assert m.stages["text_encoder"].artifacts["int8"].engine == m.stages["text_encoder"].artifacts["fp32"].engine


def test_fused_and_portable_graphs_agree(wan_artifacts):
    """The DiT's ONNX Runtime graph (MultiHeadAttention, what the CPU runs) and its portable graph
    (what TensorRT builds) give the same video (measured: identical uint8 frames at fp32; their int8
    graphs, quantized from each, 63.4 dB apart)."""
    import onnx

    from runtime.backends import OnnxRuntimeBackend

    art = wan_artifacts("wan2.1")
    m = load_manifest(art)
    kw = dict(prompt=PROMPT, frames=5, height=32, width=32, steps=3, seed=2)
    fused = Pipeline.from_dir(art)
    portable = Pipeline.for_manifest(art, m, OnnxRuntimeBackend(art, m, "fp32", contrib_ops=False))
    assert fused.stages["dit"].path.name == "dit.ort.onnx" and portable.stages["dit"].path.name == "dit.onnx"
    ops = {n.op_type for n in onnx.load(fused.stages["dit"].path, load_external_data=False).graph.node}
    assert "MultiHeadAttention" in ops and "Softmax" not in ops
    assert psnr(fused.generate(**kw).frames, portable.generate(**kw).frames) >= 50.0


@pytest.mark.parametrize("precision, bar", [("fp16", 40.0), ("int8", 30.0)])
def test_reduced_precision_video(wan_artifacts, precision, bar):
    art = wan_artifacts("wan2.1")
    kw = dict(prompt=PROMPT, frames=5, height=32, width=32, steps=3, seed=2)
    fp32 = Pipeline.from_dir(art).generate(**kw).frames
    got = Pipeline.from_dir(art, precision=precision).generate(**kw).frames
    assert psnr(got, fp32) >= bar


def test_released_only_export_flags(tmp_path):
    for flag in ("--fused-attention",):  # --text-kv is for both families
        r = run_cli("wan-export", "--preset", "tiny", "--out", tmp_path / "x", flag)
        assert r.returncode == 2
        one_line_error(r, f"{flag} is for released models: it goes with --model")
    assert not (tmp_path / "x").exists()


def test_ranges_stop_at_the_rope_length(wan_artifacts, tmp_path):
    """The tiny transformers' RoPE has 32 positions per axis (rope_max_seq_len): the exported
    ranges and the default video stop there, so a wider request is refused in one line instead
    of failing inside the graph (81x480x832 did, in a Reshape of the RoPE table)."""
    art = wan_artifacts("wan2.1")
    m = load_manifest(art)
    assert m.symbols["Wp"].max == m.symbols["Hp"].max == m.symbols["F"].max == 32
    assert (m.video["frames"], m.video["height"], m.video["width"]) == (81, 480, 512)
    r = run_cli("wan-run", art, "--prompt", "a fox", "--width", 832, "-o", tmp_path / "x.mp4")
    assert r.returncode == 2
    one_line_error(r, "width 832 is not allowed: use a multiple of 16 from 16 to 512")
    assert not (tmp_path / "x.mp4").exists()
