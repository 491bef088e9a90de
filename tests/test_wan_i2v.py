"""Wan2.2 A14B (two experts) and image-to-video (Wan2.1 I2V with CLIP embeddings, I2V-A14B with
condition latents): tiny pipelines in diffusers' layout, exported with `wan-export --model`,
against diffusers' own pipelines on the same initial latent."""

from __future__ import annotations

import numpy as np
import pytest

from engines.quality import psnr
from runtime import Pipeline
from runtime.manifest import load_manifest
from tests.conftest import run_cli
from tests.test_cli import one_line_error
from tests.test_wan import edited, set_json
from tests.wan_tiny import NEGATIVE, PROMPT, diffusers_video

SIZE = 32
REQUEST = dict(frames=9, steps=4, guidance=5.0, height=SIZE, width=SIZE)
DIFFUSERS = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_frames=9,
                 num_inference_steps=4, guidance_scale=5.0)


def picture(seed: int, h: int = 40, w: int = 24) -> np.ndarray:
    """A random uint8 image of another size and aspect than the video (both resizes are tested)."""
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def compare(pipe, folder, guidance_2=None, **images):
    """(runtime frames uint8, diffusers frames as 0..255 floats) for one request and noise."""
    extra = {} if guidance_2 is None else {"guidance_2": guidance_2}
    req = pipe.check_request(prompt=PROMPT, negative_prompt=NEGATIVE, **images, **REQUEST, **extra)
    noise = np.asarray(pipe.noise(req))
    ours = pipe.generate(prompt=PROMPT, negative_prompt=NEGATIVE, noise=noise, **images, **REQUEST, **extra).frames
    ref = diffusers_video(folder, noise, **images, **DIFFUSERS,
                          **({} if guidance_2 is None else {"guidance_scale_2": guidance_2}))
    return ours, ref * 255.0


CASES = {
    "a14b text-to-video": ("a14b", {}),
    "a14b image-to-video": ("a14b-i2v", {"image": picture(1)}),
    "a14b first and last frame": ("a14b-i2v", {"image": picture(1), "last_image": picture(2, 24, 40)}),
    "wan2.1 image-to-video": ("wan2.1-i2v", {"image": picture(1)}),
    # --text-kv builds: the text (and CLIP image) K/V from the context graphs, each expert its own
    "a14b text-to-video, --text-kv": ("a14b+kv", {}),
    "wan2.1 image-to-video, --text-kv": ("wan2.1-i2v+kv", {"image": picture(1)}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_video_matches_diffusers(case, wan_artifacts, wan_folder):
    """The acceptance test: PSNR >= 40 dB against diffusers (measured 58.9-59.0 dB in all six, the
    --text-kv builds the same as their plain ones: uint8 rounding, at most 0.5 of 255). A14B with guidance 5 / guidance_2 3 (each expert its own)."""
    version, images = CASES[case]
    pipe = Pipeline.from_dir(wan_artifacts(version))
    ours, ref = compare(pipe, wan_folder(version.split("+")[0]),
                        guidance_2=3.0 if version.startswith("a14b") else None, **images)
    assert ours.shape == ref.shape == (9, SIZE, SIZE, 3)
    assert psnr(ours, ref) >= 40.0, psnr(ours, ref)
    assert np.abs(ours - ref).max() <= 1.0


def test_text_kv_stages(wan_artifacts):
    """--text-kv: each expert has a context stage whose outputs are exactly what its step takes in
    place of the embeddings, (B, 2 * layers, tokens, dim) stacks; the plain build has none."""
    for version, experts, image in (("a14b+kv", ("dit", "dit_2"), False), ("wan2.1-i2v+kv", ("dit",), True)):
        m = load_manifest(wan_artifacts(version))
        assert m.family_config["text_kv"] is True
        for dit in experts:
            context, step = m.stages[f"{dit}_context"].spec, m.stages[dit].spec
            outputs = {t.name: t for t in context.outputs}
            assert set(outputs) == ({"text_kv", "image_kv"} if image else {"text_kv"})
            assert [t.name for t in context.inputs] == (["text", "image"] if image else ["text"])
            step_inputs = {t.name: t for t in step.inputs}
            assert not {"text", "image"} & set(step_inputs)
            tr = m.model["transformer"]
            layers, dim = tr["num_layers"], tr["num_attention_heads"] * tr["attention_head_dim"]
            for name, t in outputs.items():
                assert step_inputs[name].to_dict() == t.to_dict()
                assert (str(t.dims[1]), str(t.dims[3])) == (str(2 * layers), str(dim))
            tokens = {f"{t.name}_kv": str(t.dims[1]) for t in context.inputs}  # 512 text tokens, CLIP's
            assert {n: str(t.dims[2]) for n, t in outputs.items()} == tokens and tokens["text_kv"] == "512"
    assert "dit_context" not in load_manifest(wan_artifacts("wan2.1-i2v")).stages


def test_text_kv_precisions_engines_low_memory(wan_artifacts):
    """--text-kv at fp16 (the context graphs converted too), with TensorRT engines for every stage
    (int8, which keeps the context fp32, is measured at Wan width by python -m bench --part wan);
    --low-memory runs each expert's context once a video."""
    from runtime.backends import OnDemandStage
    from tests.conftest import HAVE_TRT_BUILDER
    from tests.test_cache import count_dit_calls

    art = wan_artifacts("a14b+kv")
    m = load_manifest(art)
    assert m.precisions() == ["fp32", "fp16"]
    assert m.quality["fp16"]["psnr_db"] >= 40
    for context in ("dit_context", "dit_2_context"):
        assert m.stages[context].artifacts["fp16"].path == f"onnx/fp16/{context}.onnx"
        if HAVE_TRT_BUILDER:
            assert all(a.engine is not None and a.engine["path"] in m.files
                       for a in m.stages[context].artifacts.values())
    kw = dict(prompt=PROMPT, frames=5, height=SIZE, width=SIZE, steps=4, guidance=5.0, guidance_2=3.0, seed=3)
    want = Pipeline.from_dir(art).generate(**kw).frames
    assert psnr(Pipeline.from_dir(art, precision="fp16").generate(**kw).frames, want) >= 40.0
    pipe = Pipeline.from_dir(art, low_memory=True)
    lazy = {n for n, s in pipe.stages.items() if isinstance(s, OnDemandStage)}
    assert {"dit_context", "dit_2_context", "dit", "dit_2"} <= lazy
    calls = count_dit_calls(pipe, ("dit_context", "dit_2_context"))
    np.testing.assert_array_equal(pipe.generate(**kw).frames, want)
    assert calls == {"dit_context": 1, "dit_2_context": 1}  # once a video each
    assert not any(pipe.stages[n].loaded for n in lazy)


def test_the_switch_and_the_image_keys_matter(wan_artifacts, wan_folder):
    """The parity above could not hold by accident: with one expert for every step, or with the
    CLIP embeddings zeroed, the same comparison shows more than rounding (measured: 38.9 dB and
    41.9 dB, max abs 31; the tiny random models' outputs are close to each other, hence not a wider gap)."""
    pipe = Pipeline.from_dir(wan_artifacts("a14b"))
    assert pipe.expert_plan(pipe.schedule(pipe.check_request(prompt=PROMPT, **REQUEST))[1].timesteps) == \
        ["dit", "dit", "dit_2", "dit_2"]  # 4 UniPC steps, shift 3: t = 999, 937 >= 875 > 833, 714
    pipe.expert_plan = lambda timesteps: ["dit"] * len(timesteps)
    ours, ref = compare(pipe, wan_folder("a14b"), guidance_2=3.0)
    assert psnr(ours, ref) < 45.0 and np.abs(ours - ref).max() > 2.0, psnr(ours, ref)

    pipe = Pipeline.from_dir(wan_artifacts("wan2.1-i2v"))
    clip = pipe.encode_clip
    pipe.encode_clip = lambda image: clip(image) * 0
    ours, ref = compare(pipe, wan_folder("wan2.1-i2v"), image=picture(1))
    assert psnr(ours, ref) < 45.0 and np.abs(ours - ref).max() > 2.0, psnr(ours, ref)


def test_clip_preprocessing_is_transformers(wan_folder, wan_artifacts):
    """runtime/clip.py (numpy + Pillow), with the settings wan-export wrote into the manifest,
    gives CLIPImageProcessor's pixels exactly."""
    from transformers import CLIPImageProcessorPil

    from runtime.clip import clip_pixels

    processor = CLIPImageProcessorPil.from_pretrained(wan_folder("wan2.1-i2v") / "image_processor")
    cfg = load_manifest(wan_artifacts("wan2.1-i2v")).family_config["clip"]
    for shape in ((40, 24), (24, 40), (8, 8), (300, 17)):
        image = picture(3, *shape)
        want = processor(images=image, return_tensors="np")["pixel_values"]
        np.testing.assert_array_equal(clip_pixels(image, cfg), want)
    for side, edge in ((224, 224), (224, 256)):  # CLIP's size; a shortest edge above the crop
        image = picture(4, 500, 375)
        proc = CLIPImageProcessorPil(size={"shortest_edge": edge}, crop_size=side)
        got = clip_pixels(image, {**cfg, "size": {"shortest_edge": edge}, "crop": side})
        np.testing.assert_array_equal(got, proc(images=image, return_tensors="np")["pixel_values"])


def test_stages_and_manifests(wan_artifacts):
    """Both experts and every new stage validated against PyTorch at two shapes (<= 1e-4
    relative); the two experts have one spec; the image conditions where the pipeline puts them."""
    expected = {
        "a14b": {"text_encoder", "dit", "dit_2", "vae_decoder_first", "vae_decoder_step"},
        "a14b-i2v": {"text_encoder", "vae_encoder_first", "vae_encoder_step", "dit", "dit_2",
                     "vae_decoder_first", "vae_decoder_step"},
        "wan2.1-i2v": {"text_encoder", "image_encoder", "vae_encoder_first", "vae_encoder_step", "dit",
                       "vae_decoder_first", "vae_decoder_step"},
    }
    for version, names in expected.items():
        m = load_manifest(wan_artifacts(version))
        assert set(m.stages) == names, version
        for name, stage in m.stages.items():
            v = stage.artifacts["fp32"].validation
            assert v["passed"] and v["max_rel"] <= 1e-4 and len(v["shapes"]) == 2, (version, name, v)
    a14b = load_manifest(wan_artifacts("a14b"))
    assert a14b.stages["dit"].spec.to_dict() == a14b.stages["dit_2"].spec.to_dict()
    assert a14b.family_config["boundary_ratio"] == 0.875
    # no release of this shape: guidance_2 follows the request's guidance, as diffusers' does
    assert "guidance_2" not in a14b.sampler
    pipe = Pipeline.from_dir(wan_artifacts("a14b"))
    assert pipe.check_request(prompt="x", guidance=7).guidance_2 == 7.0
    assert pipe.check_request(prompt="x", guidance=7, guidance_2=2).guidance_2 == 2.0
    i2v = load_manifest(wan_artifacts("wan2.1-i2v"))
    dit = {t.name: [str(d) for d in t.dims] for t in i2v.stages["dit"].spec.inputs}
    assert dit["condition"] == ["B", "20", "F", "2*Hp", "2*Wp"]  # 4 mask channels + 16 latent channels
    assert dit["image"] == ["B", "17", "4"]  # CLIP's (8/2)^2 patches + class token, hidden 4
    assert i2v.family_config["needs_image"] and not i2v.family_config["takes_last_image"]
    assert load_manifest(wan_artifacts("a14b-i2v")).family_config["takes_last_image"]


def test_reuse_copies_shared_stages(wan_artifacts):
    """--reuse: the tiny pipelines share their seeded VAE and text encoder; those stages are copied
    from the export before (same bytes, the same validation), the transformers exported anew."""
    from runtime.manifest import sha256_file

    a, b = wan_artifacts("a14b-i2v"), wan_artifacts("wan2.1-i2v")
    out = wan_artifacts.result("wan2.1-i2v").stderr
    ma, mb = load_manifest(a), load_manifest(b)
    for name in ("text_encoder", "vae_encoder_first", "vae_encoder_step", "vae_decoder_first", "vae_decoder_step"):
        art = mb.stages[name].artifacts["fp32"]
        assert art.validation["reused_from"] == str(a) and f"{name}: copied from" in out
        assert sha256_file(b / art.path) == sha256_file(a / ma.stages[name].artifacts["fp32"].path)
    assert "reused_from" not in mb.stages["dit"].artifacts["fp32"].validation  # another transformer
    assert "loading vae" not in out  # every VAE stage was there: the VAE was never loaded


def test_reduced_precision_per_expert(wan_artifacts):
    """--precision applies to both experts, each calibrated on the steps it serves; the quality
    report gives end to end and each expert reduced alone. Measured: fp16 61.1 dB, int8 50.1 dB
    (int8 dit alone 57.0, dit_2 alone 49.6)."""
    m = load_manifest(wan_artifacts("a14b"))
    assert m.precisions() == ["fp32", "fp16", "int8"]
    calls = m.calibration["dit_calls"], m.calibration["dit_2_calls"]
    assert min(calls) > 0 and sum(calls) == len(m.calibration["seeds"]) * m.calibration["steps"]
    for precision, bar in (("fp16", 40.0), ("int8", 30.0)):
        q = m.quality[precision]
        assert q["psnr_db"] >= bar and set(q["psnr_db_expert_alone"]) == {"dit", "dit_2"}
        assert all(db >= bar for db in q["psnr_db_expert_alone"].values())
        for name in ("dit", "dit_2"):
            assert m.stages[name].artifacts[precision].path == f"onnx/{precision}/{name}.onnx"
            assert q["stage_max_rel"][name] < (0.01 if precision == "fp16" else 0.05)


def test_engines_for_every_new_stage(wan_artifacts):
    """TensorRT engines (tensorrt-rtx builds them without a GPU) for both experts at every
    precision, the CLIP tower and the streaming encoder; running them needs a GPU (tests -m gpu)."""
    from tests.conftest import HAVE_TRT_BUILDER

    if not HAVE_TRT_BUILDER:
        pytest.skip("no TensorRT builder here (pip install tensorrt-rtx)")
    for version, names in (("a14b", ("dit", "dit_2")),
                           ("wan2.1-i2v", ("image_encoder", "vae_encoder_first", "vae_encoder_step", "dit"))):
        m = load_manifest(wan_artifacts(version))
        for name in names:
            for p, art in m.stages[name].artifacts.items():
                assert art.engine is not None and art.engine["path"] in m.files, (version, name, p)
    a14b = load_manifest(wan_artifacts("a14b"))
    assert a14b.stages["dit_2"].artifacts["int8"].engine["path"] == "engines/int8/dit_2.plan"


def test_image_to_video_calibrates_on_images(wan_artifacts):
    """An I2V model is calibrated and measured on images (tiny I2V-A14B at fp16: measured 59.9 dB
    end to end; dit alone 99.6 dB, dit_2 alone 59.6 dB)."""
    from export.wan.build import WanCalibration

    m = load_manifest(wan_artifacts("a14b-i2v"))
    calib = WanCalibration.for_manifest(m)
    image = calib.request(0)["image"]
    assert image.dtype == np.uint8 and image.shape == (calib.height, calib.width, 3) and image.std() > 10
    assert m.calibration["image"] and "images" in m.calibration
    assert m.quality["fp16"]["psnr_db"] >= 40 and set(m.quality["fp16"]["psnr_db_expert_alone"]) == {"dit", "dit_2"}
    assert "image" not in WanCalibration.for_manifest(load_manifest(wan_artifacts("a14b"))).request(0)


def test_low_memory_holds_one_expert(wan_artifacts):
    """--low-memory: the same video; the encoders open for encoding and each expert for its own
    steps, and nothing stays open after a generation."""
    from runtime.backends import OnDemandStage

    art = wan_artifacts("a14b-i2v")
    kw = dict(prompt=PROMPT, image=picture(1), frames=5, height=SIZE, width=SIZE, steps=4, seed=3)
    want = Pipeline.from_dir(art).generate(**kw).frames
    pipe = Pipeline.from_dir(art, low_memory=True)
    lazy = {n for n, s in pipe.stages.items() if isinstance(s, OnDemandStage)}
    assert lazy == {"text_encoder", "vae_encoder_first", "vae_encoder_step", "dit", "dit_2"}
    seen = []
    dit = pipe.stages["dit"]
    dit_2 = pipe.stages["dit_2"]

    def watch(i, seconds):
        seen.append((dit.loaded, dit_2.loaded))

    got = pipe.generate(**kw, on_step=watch).frames
    np.testing.assert_array_equal(got, want)
    assert seen == [(True, False), (True, False), (False, True), (False, True)]  # never both
    assert not any(pipe.stages[n].loaded for n in lazy)


def test_cli_experts_images_and_refusals(wan_artifacts, tmp_path):
    from PIL import Image

    first, last = tmp_path / "first.png", tmp_path / "last.png"
    Image.fromarray(picture(1)).save(first)
    Image.fromarray(picture(2)).save(last)
    out = tmp_path / "a.mp4"
    r = run_cli("wan-run", wan_artifacts("a14b-i2v"), "--prompt", PROMPT, "--image", first, "--last-image", last,
                "--frames", 5, "--height", SIZE, "--width", SIZE, "--steps", 4, "--guidance-2", 2, "--low-memory",
                "-o", out)
    assert r.returncode == 0, r.stderr
    assert "guidance 5/2" in r.stdout and "dit per step (x2)" in r.stdout and "dit_2 per step (x2)" in r.stdout
    from runtime.media import read_video

    assert read_video(out).shape == (5, SIZE, SIZE, 3)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    bad = {
        "wan2.1-i2v": [(["--prompt", "x"], "image-to-video: give --image"),
                       (["--prompt", "x", "--image", first, "--last-image", last], "takes no last image"),
                       (["--prompt", "x", "--image", broken], "image", "cannot be read"),
                       (["--prompt", "x", "--image", first, "--guidance-2", 3], "--guidance-2", "one transformer")],
        "a14b-i2v": [(["--prompt", "x", "--last-image", last], "image-to-video: give --image"),
                     (["--prompt", "x", "--image", first, "--last-image", broken], "last image", "cannot be read"),
                     (["--prompt", "x", "--image", first, "--guidance-2", -1], "guidance 2 -1")],
        "a14b": [(["--prompt", "x", "--image", first], "takes no image")],
        "wan2.1": [(["--prompt", "x", "--low-memory", "--last-image", last], "takes no last image")],
    }
    for version, cases in bad.items():
        for args, *needles in cases:
            one_line_error(run_cli("wan-run", wan_artifacts(version), *args, "-o", tmp_path / "bad.mp4"), *needles)
    assert not (tmp_path / "bad.mp4").exists()


BAD_FOLDERS = {
    "transformer_2 without boundary_ratio": ("a14b", lambda d: set_json(d / "model_index.json", boundary_ratio=None),
                                             "names transformer_2 but no boundary_ratio"),
    "boundary_ratio out of range": ("a14b", lambda d: set_json(d / "model_index.json", boundary_ratio=1.5),
                                    "boundary_ratio 1.5"),
    "experts that differ": ("a14b", lambda d: set_json(d / "transformer_2" / "config.json", text_dim=64),
                            "transformer_2 does not match", "text_dim"),
    "expert weights missing": ("a14b", lambda d: (d / "transformer_2" / "diffusion_pytorch_model.safetensors").unlink(),
                               "transformer_2 folder", "no .safetensors"),
    "i2v channels": ("a14b-i2v", lambda d: [set_json(d / c / "config.json", in_channels=16)
                                            for c in ("transformer", "transformer_2")],
                     "in/out channels 16/16", "takes 36/16"),
    "first-last-frame clip": ("wan2.1-i2v", lambda d: set_json(d / "transformer" / "config.json", pos_embed_seq_len=34),
                              "first-last-frame", "not supported yet"),
    "clip width": ("wan2.1-i2v", lambda d: set_json(d / "image_encoder" / "config.json", hidden_size=8),
                   "hidden_size 8", "image_dim 4"),
    "no image processor": ("wan2.1-i2v", lambda d: set_json(d / "model_index.json", image_processor=[None, None]),
                           "no image_processor"),
    "crop not the encoder's size": ("wan2.1-i2v", lambda d: set_json(d / "image_processor" / "preprocessor_config.json",
                                                                    crop_size={"height": 16, "width": 16}),
                                    "crops to (16, 16)"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_wan_export_refuses_bad_folders(case, wan_folder, tmp_path):
    """One line each, from the JSON files and file names, before any weight is loaded."""
    from export.wan.build import build_wan_artifacts
    from runtime.errors import WanError

    version, change, *needles = BAD_FOLDERS[case]
    folder = edited(wan_folder(version), tmp_path, change)
    with pytest.raises(WanError) as err:
        build_wan_artifacts(folder, tmp_path / "out")
    assert all(n in str(err.value) for n in needles) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists()


def test_reuse_refusals(wan_folder, tiny_dir, tmp_path):
    one_line_error(run_cli("wan-export", "--model", wan_folder("a14b"), "--out", tmp_path / "o", "--reuse", tiny_dir),
                   "--reuse", "project's own model")
    one_line_error(run_cli("wan-export", "--model", wan_folder("a14b"), "--out", tmp_path / "o", "--reuse",
                           tmp_path / "nothing"), "nothing")
    one_line_error(run_cli("wan-export", "--preset", "tiny", "--out", tmp_path / "o", "--reuse", tiny_dir),
                   "--reuse", "--model")
    assert not (tmp_path / "o").exists()


def test_source_digest_covers_what_shapes_a_graph(wan_folder):
    """--reuse matches a stage's source digest: the typical size (each release's default video)
    does not change it, the exported range and the weights do."""
    import dataclasses

    from export.wan.build import defaults, stage_sources, symbol_ranges
    from export.wan.checkpoint import read_checkpoint

    ckpt = read_checkpoint(wan_folder("a14b"))
    symbols = symbol_ranges(ckpt, defaults(ckpt)[1])

    def text_source(symbols, opset=20):
        return stage_sources(ckpt, {"text_encoder": "text_encoder"}, symbols, opset)["text_encoder"]

    digest = text_source(symbols)
    other_opt = {**symbols, "Hp": dataclasses.replace(symbols["Hp"], opt=symbols["Hp"].opt + 1)}
    other_max = {**symbols, "Hp": dataclasses.replace(symbols["Hp"], max=symbols["Hp"].max - 1)}
    assert text_source(other_opt) == digest
    assert text_source(other_max) != digest
    assert text_source(symbols, 21) != digest
    assert stage_sources(ckpt, {"dit": "transformer"}, symbols, 20)["dit"] != \
        stage_sources(ckpt, {"dit": "transformer_2"}, symbols, 20)["dit"]  # other weights


def test_known_releases_of_one_shape():
    """Wan2.1 I2V 480P and 720P share a transformer shape: told apart by the folder's name, else
    the scheduler's flow shift."""
    from export.wan.known import match

    i2v = {"num_attention_heads": 40, "attention_head_dim": 128, "num_layers": 40, "ffn_dim": 13824,
           "in_channels": 36, "image_dim": 1280}
    assert match(i2v, folder="Wan2.1-I2V-14B-720P-Diffusers").height == 720
    assert match(i2v, folder="my-finetune", flow_shift=5.0).height == 720
    assert match(i2v, folder="my-finetune", flow_shift=3.0).height == 480
    assert match(i2v, folder="my-finetune").height == 480  # neither says: the first
    assert match(i2v, two_experts=True).name == "Wan-AI/Wan2.2-I2V-A14B-Diffusers"  # two experts: A14B only


def test_low_memory_refused_where_it_holds_nothing_back(tiny_dir, tmp_path, reference_image):
    """The project's own model uses every stage at every step: --low-memory says so in one line."""
    from PIL import Image

    ref = tmp_path / "ref.png"
    Image.fromarray(reference_image).save(ref)
    one_line_error(run_cli("wan-run", tiny_dir, "--image", ref, "--low-memory", "-o", tmp_path / "x.mp4"),
                   "--low-memory does not apply")
    assert not (tmp_path / "x.mp4").exists()
