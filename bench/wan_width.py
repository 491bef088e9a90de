"""`python -m bench --part wan`: a Wan2.1-1.3B-shaped model against diffusers, in one process.

The transformer has the 1.3B release's shape (dim 1536 = 12 heads x 128, ffn 8960, text_dim
4096, patch (1, 2, 2)) with random weights and 2 of its 30 layers; the VAE is the Wan2.1 VAE at
reduced width and the text encoder a 2-layer UMT5 at the released width (bench/wan_scale.py's
folder). It is exported twice (plain, and `--text-kv` reusing the plain build's encoder and VAE),
both with `--fused-attention` (the portable step graphs are timed too) at fp32 and int8 (calibrated on a small video so the build takes minutes). Then, on the same
inputs, back to back:

    dit          one DiT step, CFG batch 2: diffusers' transformer eager and torch.compile-d, the
                 runtime's graphs (ort-fp32, ort-int8, and -kv: the --text-kv step graph)
    dit_context  the --text-kv context graph, run once per video per expert
    end_to_end   diffusers' WanPipeline against the runtime (each lever; --cache rows too) from
                 the same initial latent

Per-layer figures scale to the 30-layer model as (step - shared) / 2 * 30 + shared, "shared" the
text projection, timestep embedding, patch embedding and head, which are counted separately
(the FLOP counts of 1 and 2 layers, on the meta device).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from bench.measure import flops, ort_op_profile, timed
from bench.step_cache import cache_records

log = logging.getLogger("bench")

MODEL = "wan2.1-1.3b-2layers"
LAYERS = 2
VIDEO = {"frames": 17, "height": 128, "width": 128}  # latent (16, 5, 16, 16): 5 x 8 x 8 = 320 tokens
STEPS = 6
PROMPT, NEGATIVE = "a red fox runs through snow", "blurry"
GUIDANCE = 5.0
CACHE_SETTINGS = ("teacache:0.2",)


def build(root: Path, progress) -> dict[str, Path]:
    """The folder and its two exports (plain and --text-kv), fp32 + int8."""
    from bench.wan_scale import make_folder
    from export.wan.build import WanCalibration, build_wan_artifacts

    folder = root / "model"
    make_folder(folder, LAYERS)
    progress("folder")
    # two calibration videos and one held-out at the bench's size, fewer steps: minutes, not an hour
    calib = WanCalibration(9, VIDEO["height"], VIDEO["width"], 4, seeds=(0, 1), holdout_seeds=(2,))
    out = {"folder": folder}
    for name, kv in (("plain", False), ("kv", True)):
        reuse = out.get("plain")  # the kv build copies the plain build's text encoder and VAE
        out[name] = root / name
        build_wan_artifacts(folder, out[name], precisions=("fp32", "int8"), text_kv=kv, calibration=calib,
                            reuse=reuse, fused_attention=True)
        progress(f"export {name}")
    return out


def top(shares: dict[str, float], n: int = 6) -> dict[str, float]:
    """The `n` largest shares, the rest summed as "other"."""
    items = sorted(shares.items(), key=lambda kv: -kv[1])
    return {**dict(items[:n]), "other": sum(v for _, v in items[n:])}


def torch_op_profile(fn) -> dict[str, float]:
    """Share of the self CPU time each aten operator takes in `fn()` (torch's profiler, one warm
    call before)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    times = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(times.values()) or 1.0
    return {k: v / total for k, v in times.items()}


def time_components(pipeline, parts: dict[str, str]) -> dict[str, float]:
    """Times the next calls of the pipeline's components (`parts`: label -> attribute; the VAE's
    `decode`, the others' forward) into a dict of milliseconds filled in as they run."""
    import time

    spent = {label: 0.0 for label in parts}
    for label, attr in parts.items():
        module = getattr(pipeline, attr)
        name = "decode" if attr == "vae" else "forward"
        inner = getattr(module, name)

        def wrapped(*a, _inner=inner, _label=label, **kw):
            t0 = time.perf_counter()
            try:
                return _inner(*a, **kw)
            finally:
                spent[_label] += (time.perf_counter() - t0) * 1000

        setattr(module, name, wrapped)
    return spent


def step_flops(transformer, latent, t, text) -> dict[str, float]:
    """FLOPs of one step of the 2-layer model and of its 1-layer truncation (the difference is
    one layer), and of the --text-kv context (text projection + every layer's K/V)."""
    import copy

    import torch

    from export.wan.stages import ContextStage, DiTStage

    one = copy.deepcopy(transformer)
    one.blocks = torch.nn.ModuleList(one.blocks[:1])
    two = flops(DiTStage(transformer, False), latent, t, text)
    per_layer = two - flops(DiTStage(one, False), latent, t, text)
    context = flops(ContextStage(transformer), text)
    return {"step": two, "per_layer": per_layer, "shared": two - LAYERS * per_layer, "context": context,
            "context_per_layer": context - flops(ContextStage(one), text)}


def run(runs: int, compile_: bool, peak: float, progress) -> list[dict]:
    import torch
    from diffusers import WanPipeline, WanTransformer3DModel

    from export.quality import psnr
    from runtime import Pipeline
    from runtime.backends import OnnxRuntimeBackend

    records: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(Path(tmp), progress)
        transformer = WanTransformer3DModel.from_pretrained(paths["folder"] / "transformer").eval()
        pipes = {f"ort-{p}{'-kv' if kind == 'kv' else ''}": Pipeline.from_dir(paths[kind], precision=p)
                 for kind in ("plain", "kv") for p in ("fp32", "int8")}
        fp32 = pipes["ort-fp32"]
        rng = np.random.default_rng(0)
        latent_shape = fp32.latent_shape(VIDEO["frames"], VIDEO["height"], VIDEO["width"])
        latent = rng.standard_normal((2, *latent_shape[1:]), dtype=np.float32)  # CFG batch 2
        t = np.full((2,), 500.0, np.float32)
        text = rng.standard_normal((2, 512, 4096), dtype=np.float32)
        counted = step_flops(transformer, *(torch.from_numpy(a) for a in (latent, t, text)))
        shapes = {"latent": list(latent.shape), "timestep": [2], "text": list(text.shape)}
        base = {"model": MODEL, "layers": LAYERS, "peak_gflops": peak, "shapes": shapes}

        def record(stage, impl, timing, gflop=None, **extra):
            r = {"stage": stage, "impl": impl, **timing, **base, **extra}
            if gflop is not None:
                r.update(gflop=gflop / 1e9, achieved_gflops=gflop / 1e6 / timing["median_ms"])
            records.append(r)
            log.info("%-12s %-20s %9.1f ms", stage, impl, timing["median_ms"])

        # --- one DiT step -------------------------------------------------------------
        args = tuple(torch.from_numpy(a) for a in (latent, t, text))
        call = lambda m: m(hidden_states=args[0], timestep=args[1], encoder_hidden_states=args[2],  # noqa: E731
                           return_dict=False)
        with torch.no_grad():
            record("dit", "diffusers-eager", timed(lambda: call(transformer), runs=runs), counted["step"])
            if compile_:
                try:
                    compiled = torch.compile(transformer)
                    call(compiled)  # compiles
                    record("dit", "diffusers-compile", timed(lambda: call(compiled), runs=runs), counted["step"])
                except Exception as exc:  # inductor needs a working C++ toolchain
                    records.append({"stage": "dit", "impl": "diffusers-compile", "median_ms": None, **base,
                                    "error": str(exc).splitlines()[0][:200]})
        progress("diffusers step")
        for impl, pipe in pipes.items():
            dit = pipe.stages["dit"]
            if impl.endswith("-kv"):
                ctx = pipe.stages["dit_context"]
                record("dit_context", impl, timed(lambda: ctx(text=text), runs=runs), counted["context"])
                kv = ctx(text=text)["text_kv"]
                record("dit", impl, timed(lambda: dit(latent=latent, timestep=t, text_kv=kv), runs=runs),
                       counted["step"] - counted["context"])
            else:
                record("dit", impl, timed(lambda: dit(latent=latent, timestep=t, text=text), runs=runs),
                       counted["step"])
                # the same step as the portable graph (what TensorRT builds): the fused attention's gain
                m, p = pipe.manifest, impl.removeprefix("ort-")
                portable = OnnxRuntimeBackend(paths["plain"], m, p, contrib_ops=False).stages["dit"]
                record("dit", f"{impl}-portable", timed(lambda: portable(latent=latent, timestep=t, text=text),
                                                        runs=runs), counted["step"])
        # where the time goes: the top operators of each step (ONNX Runtime's profiler, torch's)
        feeds = {"latent": latent, "timestep": t, "text": text}
        for impl in ("ort-fp32", "ort-int8"):
            records.append({"stage": "dit", "impl": impl, "profile": top(ort_op_profile(pipes[impl].stages["dit"].path,
                                                                                         feeds)), **base})
        records.append({"stage": "dit", "impl": "diffusers-eager", "profile": top(torch_op_profile(
            lambda: call(transformer))), **base})
        progress("runtime step")

        # --- end to end, from the same initial latent ------------------------------------
        noise = fp32.noise(fp32.check_request(PROMPT, frames=VIDEO["frames"], height=VIDEO["height"],
                                              width=VIDEO["width"]))
        request = {"prompt": PROMPT, "negative_prompt": NEGATIVE, **VIDEO, "steps": STEPS, "guidance": GUIDANCE}
        e2e = {**VIDEO, "steps": STEPS}
        reference = WanPipeline.from_pretrained(paths["folder"])
        reference.set_progress_bar_config(disable=True)

        def diffusers_video():
            with torch.no_grad():
                return reference(prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=VIDEO["frames"],
                                 height=VIDEO["height"], width=VIDEO["width"], num_inference_steps=STEPS,
                                 guidance_scale=GUIDANCE, latents=torch.from_numpy(noise), output_type="np").frames[0]

        timing = timed(diffusers_video, runs=runs)
        spent = time_components(reference, {"encode": "text_encoder", "dit": "transformer", "decode": "vae"})
        want = (np.clip(diffusers_video(), 0, 1) * 255).round().astype(np.uint8)
        record("end_to_end", "diffusers-eager", timing, shapes=e2e, breakdown_ms=spent)
        progress("diffusers end to end")
        videos = {}
        for impl, pipe in pipes.items():
            result = pipe.generate(**request, noise=noise)
            videos[impl], tm = result.frames, result.timings
            gen = lambda pipe=pipe: pipe.generate(**request, noise=noise)  # noqa: E731
            record("end_to_end", impl, timed(gen, runs=runs), shapes=e2e,
                   breakdown_ms={"encode": tm.encode * 1000, "dit": sum(tm.dit) * 1000, "decode": tm.decode * 1000},
                   psnr_vs_diffusers_db=psnr(videos[impl], want),
                   **({"psnr_vs_fp32_db": psnr(videos[impl], videos["ort-fp32"])} if impl != "ort-fp32" else {}))
        progress("runtime end to end")
        for impl in ("ort-fp32", "ort-int8-kv"):  # the cache alone, and on top of the other levers
            for r in cache_records(lambda pipe=pipes[impl], **kw: pipe.generate(**kw, noise=noise), [request], runs,
                                   CACHE_SETTINGS, scenes=False, impl=impl, model=MODEL, shapes=e2e):
                if r["cache"] != "off":  # the uncached row is the impl's own above
                    records.append(r)
        progress("cache")
        records.append({"stage": "dit", "impl": "analytic-30-layers", "model": "wan2.1-1.3b", "median_ms": None,
                        **{f"{k}_gflop": v / 1e9 for k, v in counted.items()},
                        "step_30_layers_gflop": (counted["shared"] + 30 * counted["per_layer"]) / 1e9,
                        "context_30_layers_gflop": (counted["context"] - LAYERS * counted["context_per_layer"]
                                                    + 30 * counted["context_per_layer"]) / 1e9,
                        "shapes": shapes})
    return records + projection()


def goals(records: list[dict]) -> list[tuple[str, float | None, float, bool]]:
    """The issue's goals for this part as (what, measured, goal, more is better)."""
    def get(stage, impl, key="median_ms"):
        return next((r.get(key) for r in records if r.get("model") == MODEL and r["stage"] == stage
                     and r["impl"] == impl and r.get(key) is not None), None)

    def ratio(a, b):
        return a / b if a and b else None

    runtime_e2e = [r for r in records if r.get("model") == MODEL and r["stage"] == "end_to_end"
                   and r["impl"].startswith("ort-") and r.get("median_ms")]
    fastest = min(runtime_e2e, key=lambda r: r["median_ms"], default=None)
    label = "none" if fastest is None else fastest["impl"].split("-cache-")[0] + (
        f" --cache {fastest['cache']}" if "cache" in fastest else "")
    dit = get("dit", "ort-fp32", "achieved_gflops")
    return [
        ("Wan width, DiT step: ort-fp32 over diffusers-eager", ratio(get("dit", "diffusers-eager"),
                                                                     get("dit", "ort-fp32")), 1.2, True),
        ("Wan width, DiT step: ort-int8 over ort-fp32", ratio(get("dit", "ort-fp32"), get("dit", "ort-int8")),
         2.0, True),
        ("Wan width, int8 video vs fp32 (dB)", get("end_to_end", "ort-int8", "psnr_vs_fp32_db"), 30.0, True),
        ("Wan width, end to end: ort-fp32 over diffusers' pipeline", ratio(get("end_to_end", "diffusers-eager"),
                                                                            get("end_to_end", "ort-fp32")), 1.5, True),
        (f"Wan width, end to end: the fastest runtime setting ({label}) over diffusers' pipeline",
         ratio(get("end_to_end", "diffusers-eager"), fastest and fastest["median_ms"]), 1.5, True),
        ("Wan width, DiT step ort-fp32: share of the matmul peak", dit / get("dit", "ort-fp32", "peak_gflops")
         if dit else None, 0.5, True),
    ]


# The released transformers' shapes (their config.json) and the latent each resolution makes.
RELEASED = {
    "wan2.2-ti2v-5b": {"num_attention_heads": 24, "ffn_dim": 14336, "num_layers": 30, "in_channels": 48},
    "wan2.2-a14b-expert": {"num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40, "in_channels": 16},
}
PROJECTED = (("wan2.2-ti2v-5b", "720p", 121, 704, 1280, 16), ("wan2.2-a14b-expert", "480p", 81, 480, 832, 8),
             ("wan2.2-a14b-expert", "720p", 81, 720, 1280, 8))
# Dense tensor peaks of an H100 / H200 SXM (the same compute; the H200 has more memory and bandwidth).
PEAK_TFLOPS = {"bf16": 989.0, "fp8": 1979.0}


def projection() -> list[dict]:
    """FLOPs of one denoising step (CFG: two transformer calls) of the released transformers at
    their resolutions, counted through diffusers' own class on the meta device (nothing is
    allocated), with the time that step takes at the dense bf16 / fp8 peaks."""
    import torch
    from diffusers import WanTransformer3DModel
    from torch.utils.flop_counter import FlopCounterMode

    out = []
    for name, label, frames, height, width, stride in PROJECTED:
        shape = {**RELEASED[name]}
        channels = shape["in_channels"]
        latent = (1, channels, (frames - 1) // 4 + 1, height // stride, width // stride)
        with torch.device("meta"):
            model = WanTransformer3DModel(patch_size=(1, 2, 2), attention_head_dim=128, out_channels=channels,
                                          text_dim=4096, freq_dim=256, cross_attn_norm=True,
                                          qk_norm="rms_norm_across_heads", **shape)
            args = torch.randn(latent), torch.rand(1), torch.randn(1, 512, 4096)
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                model(hidden_states=args[0], timestep=args[1], encoder_hidden_states=args[2], return_dict=False)
        total = counter.get_total_flops()
        attention = sum(v for k, v in counter.get_flop_counts()["Global"].items() if "bmm" in str(k)
                        or "attention" in str(k))
        step = 2 * total  # CFG
        out.append({"stage": "dit", "impl": "projection", "model": name, "resolution": label, "frames": frames,
                    "height": height, "width": width, "tokens": latent[2] * (latent[3] // 2) * (latent[4] // 2),
                    "step_tflop": step / 1e12, "attention_share": attention / total, "median_ms": None,
                    **{f"{p}_peak_ms": step / (tf * 1e12) * 1000 for p, tf in PEAK_TFLOPS.items()}})
    return out
