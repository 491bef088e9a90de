"""`python -m bench --out DIR [--part small|wan]`: the runtime against PyTorch, diffusers and the
hardware limit.

Writes DIR/results.json (a list of records: stage, impl, median_ms, p90_ms, runs, shapes, and
achieved GFLOP/s against the matmul peak measured in the same run), DIR/results.md and
DIR/results.png. All implementations run on the same inputs in this process, back to back,
with warm-up calls before the timed runs. Two parts:

    small   the project's model (--preset): the reference encode (1 frame), one DiT step (batch
            2: CFG; also on a --text-kv build, with its context call), the whole-clip decode,
            the streaming decode, the whole pipeline, step caching (bench/step_cache.py) and
            decode memory
    wan     a Wan2.1-1.3B-shaped model with 2 of its 30 layers against diffusers
            (bench/wan_width.py): the DiT step, the --text-kv context and end to end
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import tempfile
from pathlib import Path

import click
import numpy as np
import torch

from bench import wan_width
from bench.measure import decode_peak_rss_mb, flops, matmul_peak_gflops, timed
from bench.step_cache import cache_table, cache_records
from export.calibration import reference_image
from export.config import get_preset
from export.dit import WanDiT, stage_view
from export.pipeline import ReferencePipeline
from export.vae import VAEDecoderStage, VAEEncoderStage
from export.weights import build_models
from runtime import Pipeline
from runtime.backends import OnnxRuntimeBackend
from runtime.errors import WanError
from runtime.manifest import load_manifest
from runtime.stages import CONTEXT_STAGE

log = logging.getLogger("bench")


def stage_inputs(pipe: Pipeline, cfg) -> dict[str, dict[str, np.ndarray]]:
    v = cfg.video
    g = pipe.manifest.geometry
    specs = {n: s.spec for n, s in pipe.manifest.stages.items()}
    return {
        "vae_encoder": specs["vae_encoder"].sample_inputs(g.env(1, 1, v.height, v.width)),
        "dit": specs["dit"].sample_inputs(g.env(2, v.frames, v.height, v.width)),
        "vae_decoder": specs["vae_decoder"].sample_inputs(g.env(1, v.frames, v.height, v.width)),
    }


def run(cfg, artifacts: Path, runs: int, compile_: bool, rss_frames: tuple[int, ...], peak: float,
        kv_artifacts: Path | None = None) -> list[dict]:
    records: list[dict] = []
    kv = Pipeline.from_dir(kv_artifacts) if kv_artifacts is not None else None  # (checked in main)
    vae, dit = build_models(cfg)
    modules = {"vae_encoder": VAEEncoderStage(vae), "dit": dit, "vae_decoder": VAEDecoderStage(vae)}
    pipes = {p: Pipeline.from_dir(artifacts, precision=p) for p in Pipeline.from_dir(artifacts).manifest.precisions()}
    inputs = stage_inputs(pipes["fp32"], cfg)
    shapes = {n: {k: list(a.shape) for k, a in x.items()} for n, x in inputs.items()}
    counted = {n: flops(modules[n], *(torch.from_numpy(a) for a in inputs[n].values())) for n in inputs}

    def record(stage, impl, t, counted_as=None, **extra):
        r = {"stage": stage, "impl": impl, **t, **extra}
        key = counted_as or stage
        if key in counted:
            r.update(gflop=counted[key] / 1e9, achieved_gflops=counted[key] / 1e6 / t["median_ms"],
                     peak_gflops=peak, shapes=shapes[key])
        records.append(r)
        log.info("%-12s %-14s %9.1f ms", stage, impl, t["median_ms"])

    torch_impls = {"torch-eager": modules}
    if compile_:
        try:
            compiled = {n: torch.compile(m) for n, m in modules.items()}
            with torch.no_grad():
                for n, m in compiled.items():
                    m(*(torch.from_numpy(a) for a in inputs[n].values()))
            torch_impls["torch-compile"] = compiled
        except Exception as exc:  # inductor needs a working C++ toolchain
            records.append({"stage": "dit", "impl": "torch-compile", "median_ms": None,
                            "error": str(exc).splitlines()[0][:200]})
    for impl, mods in torch_impls.items():
        for n, m in mods.items():
            args = tuple(torch.from_numpy(a) for a in inputs[n].values())
            with torch.no_grad():
                record(n, impl, timed(lambda: m(*args), runs=runs))
    for p, pipe in pipes.items():
        for n in inputs:
            stage, feed = pipe.stages[n], inputs[n]
            record(n, f"ort-{p}", timed(lambda: stage(**feed), runs=runs))
        if pipe.manifest.stages["dit"].artifacts[p].ort_graph is not None:
            # the same DiT as the portable graph (what TensorRT builds): the fused kernels' gain
            portable = OnnxRuntimeBackend(artifacts, pipe.manifest, p, contrib_ops=False).stages["dit"]
            record("dit", f"ort-{p}-portable", timed(lambda: portable(**inputs["dit"]), runs=runs))
        if not pipe.can_stream:
            continue
        latent = inputs["vae_decoder"]["latent"]
        t = timed(lambda: list(pipe.decode_stream(latent)), runs=runs)
        records.append({"stage": "vae_decoder", "impl": f"ort-{p}-stream", **t, "shapes": shapes["vae_decoder"]})
    if kv is not None:  # --text-kv: the same step on reference K/V made once (the context timed apart)
        reference = {k: inputs["dit"][k] for k in ("ref_latent", "motion")}
        kv_feed = {"latent": inputs["dit"]["latent"], "timestep": inputs["dit"]["timestep"],
                   **kv.stages[CONTEXT_STAGE](**reference)}
        shapes["dit_kv"] = {k: list(a.shape) for k, a in kv_feed.items()}
        counted["dit_kv"] = flops(stage_view(dit, "step"), *(torch.from_numpy(a) for a in kv_feed.values()))
        record("dit", "ort-fp32-kv", timed(lambda: kv.stages["dit"](**kv_feed), runs=runs), counted_as="dit_kv")
        record(CONTEXT_STAGE, "ort-fp32", timed(lambda: kv.stages[CONTEXT_STAGE](**reference), runs=runs))

    # end to end: reference image -> video at the preset's defaults, same noise everywhere
    v, s = cfg.video, cfg.sampler
    image = reference_image(0, v.height, v.width)
    req = pipes["fp32"].check_request()
    noise = pipes["fp32"].noise(req)
    ref = ReferencePipeline(vae, dit)
    e2e_shape = {"frames": v.frames, "height": v.height, "width": v.width, "steps": s.steps}
    maps, _ = pipes["fp32"].motion_maps(image, req)  # the seed's motion, as the runtime draws it
    torch_e2e = lambda: ref.generate(image, maps, noise, s.steps, s.guidance, s.shift, s.solver,  # noqa: E731
                                     s.guidance_rescale)
    record("end_to_end", "torch-eager", timed(torch_e2e, runs=runs), shapes=e2e_shape)
    for p, pipe in pipes.items():
        record("end_to_end", f"ort-{p}", timed(lambda: pipe(image, noise=noise), runs=runs), shapes=e2e_shape)
    if kv is not None:
        record("end_to_end", "ort-fp32-kv", timed(lambda: kv(image, noise=noise), runs=runs), shapes=e2e_shape)
    # step caching: quality against the uncached video over four references (seeds 10..13)
    requests = [{"image": reference_image(10 + i, v.height, v.width), "seed": i} for i in range(4)]
    for r in cache_records(pipes["fp32"].generate, requests, runs, model=cfg.name, shapes=e2e_shape):
        if r["cache"] != "off":  # the uncached row is ort-fp32's above
            records.append(r)

    # decode peak memory as the clip grows (fresh process per measurement)
    for frames in rss_frames:
        for stream in (True, False):
            rss = decode_peak_rss_mb(str(artifacts), frames, v.height, v.width, stream)
            records.append({"stage": "vae_decoder", "impl": "ort-fp32-stream" if stream else "ort-fp32",
                            "frames": frames, **rss})
            log.info("decode %d frames %s: peak RSS %.0f MB (+%.0f MB decoding)", frames,
                     "stream" if stream else "whole", rss["peak_rss_mb"], rss["decode_rss_mb"])
    records.extend(scaling(cfg, runs))
    return records


def scaling(cfg, runs: int) -> list[dict]:
    """DiT step FLOPs (and time, where small enough to run) vs frames and resolution,
    factorized vs full attention; the wan2.2-5b shape is counted on the meta device only."""
    out = []
    for attention in ("factorized", "full"):
        c = dataclasses.replace(cfg.dit, attention=attention)
        dit = WanDiT(c, cfg.vae.z_dim).eval()
        for frames, size in ((5, 128), (17, 128), (33, 128), (17, 64), (17, 256)):
            g = cfg.geometry
            shape = (2, cfg.vae.z_dim, g.frames_to_latent(frames), size // 8, size // 8)
            x, t, r = torch.randn(shape), torch.rand(2) * 1000, torch.randn(*shape[:2], 1, *shape[3:])
            m = torch.eye(2, 3).expand(2, shape[2], 2, 3)  # identity motion maps
            with torch.no_grad():
                rec = timed(lambda: dit(x, t, r, m), runs=runs)
            out.append({"stage": "dit", "impl": "torch-eager", "scaling": attention, "frames": frames,
                        "height": size, "width": size, "tokens": shape[2] * (size // 16) ** 2,
                        "gflop": flops(dit, x, t, r, m) / 1e9, **rec})
    return out + analytic_wan22_5b()


def analytic_wan22_5b() -> list[dict]:
    """FLOPs of one DiT step (CFG batch 2) at Wan2.2-TI2V-5B's shape, 480p and 720p, factorized
    vs full attention, counted on the meta device (nothing is allocated or run)."""
    out = []
    big = get_preset("wan2.2-5b")
    for label, (frames, h, w) in {"480p": (81, 480, 832), "720p": (121, 704, 1280)}.items():
        for attention in ("factorized", "full"):
            c = dataclasses.replace(big.dit, attention=attention)
            with torch.device("meta"):
                dit = WanDiT(c, big.vae.z_dim)
                g = big.geometry
                shape = (2, big.vae.z_dim, g.frames_to_latent(frames), h // g.spatial_stride, w // g.spatial_stride)
                x, t, r = torch.randn(shape), torch.rand(2), torch.randn(*shape[:2], 1, *shape[3:])
                m = torch.eye(2, 3).expand(2, shape[2], 2, 3)
                gflop = flops(dit, x, t, r, m) / 1e9  # inside: tables made in forward go to meta too
            tokens = shape[2] * (h // g.pixels_per_token[0]) * (w // g.pixels_per_token[1])
            out.append({"stage": "dit", "impl": "analytic", "scaling": attention, "model": "wan2.2-5b",
                        "resolution": label, "frames": frames, "height": h, "width": w, "tokens": tokens,
                        "gflop": gflop, "median_ms": None})
    return out


def small_gflop_per_video(steps: int) -> float:
    """FLOPs of one `small` video at its default size: the reference encode, `steps` DiT calls
    (CFG batch 2) and the decode (random weights: FLOPs do not depend on them)."""
    cfg = get_preset("small")
    vae, dit = build_models(cfg)
    v, g = cfg.video, cfg.geometry
    shape = (2, cfg.vae.z_dim, g.frames_to_latent(v.frames), v.height // 8, v.width // 8)
    x, t, r = torch.randn(shape), torch.rand(2) * 1000, torch.randn(*shape[:2], 1, *shape[3:])
    m = torch.eye(2, 3).expand(2, shape[2], 2, 3)
    step = flops(dit, x, t, r, m)
    encode = flops(VAEEncoderStage(vae), torch.randn(1, 3, 1, v.height, v.width))
    decode = flops(VAEDecoderStage(vae), torch.randn(1, *shape[1:]))
    return (encode + steps * step + decode) / 1e9


def speedups(records: list[dict]) -> list[tuple[str, float | None, float, bool]]:
    """The runtime's goals as (what, measured ratio, goal, whether more is better): DiT step
    ONNX Runtime fp32 vs PyTorch eager, int8 vs fp32, the whole pipeline vs the PyTorch
    reference, and streaming decode peak memory for the longest clip vs the shortest."""
    def ms(stage, impl):
        return next((r["median_ms"] for r in records if r["stage"] == stage and r["impl"] == impl
                     and "scaling" not in r and not is_wan(r) and r.get("median_ms")), None)

    def ratio(a, b):
        return a / b if a and b else None

    rss = {r["frames"]: r["peak_rss_mb"] for r in records if r.get("impl") == "ort-fp32-stream" and "peak_rss_mb" in r}
    lo, hi = (min(rss), max(rss)) if rss else (None, None)
    return [
        ("DiT step: ort-fp32 speed-up over torch-eager", ratio(ms("dit", "torch-eager"), ms("dit", "ort-fp32")),
         1.3, True),
        ("DiT step: ort-int8 speed-up over ort-fp32", ratio(ms("dit", "ort-fp32"), ms("dit", "ort-int8")), 2.0, True),
        ("end to end: ort-fp32 speed-up over torch-eager", ratio(ms("end_to_end", "torch-eager"),
                                                                  ms("end_to_end", "ort-fp32")), 1.5, True),
        (f"streaming decode peak RSS, {hi} vs {lo} frames (at most)", ratio(rss.get(hi), rss.get(lo)), 1.25,
         False),
    ]


def is_wan(r: dict) -> bool:
    return r.get("model") == wan_width.MODEL or r.get("impl") in ("analytic-30-layers", "projection")


def goal_rows(goals) -> list[str]:
    lines = ["| goal | measured | target | met |", "|---|---:|---:|---|"]
    for what, got, goal, more_is_better in goals:
        met = got is not None and (got >= goal if more_is_better else got <= goal)
        unit = "" if "dB" in what else ("" if "share" in what else "x")
        shown = "n/a" if got is None else (f"{got:.0%}" if "share" in what else f"{got:.2f}{unit}")
        target = f"{goal:.0%}" if "share" in what else f"{goal:g}{unit}"
        lines.append(f"| {what} | {shown} | {target} | {'yes' if met else 'no'} |")
    return lines


def timing_rows(records: list[dict], peak: float) -> list[str]:
    lines = ["| stage | impl | median ms | p90 ms | GFLOP | GFLOP/s | % of peak |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in records:
        if r.get("median_ms") is not None and "scaling" not in r and "peak_rss_mb" not in r and "cache" not in r:
            g = r.get("gflop")
            lines.append(f"| {r['stage']} | {r['impl']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | "
                         + (f"{g:.2f} | {r['achieved_gflops']:.0f} | {100 * r['achieved_gflops'] / peak:.0f}% |"
                            if g else "| | |"))
        elif r.get("error"):
            lines.append(f"| {r['stage']} | {r['impl']} | failed: {r['error']} | | | | |")
    return lines


def write_report(records: list[dict], out: Path, cfg) -> None:
    (out / "results.json").write_text(json.dumps(records, indent=1) + "\n")
    peak = next(r["peak_gflops"] for r in records if "peak_gflops" in r)
    small = [r for r in records if not is_wan(r)]
    wan = [r for r in records if is_wan(r)]
    lines = [f"# wan-export benchmark{f': preset `{cfg.name}`' if small else ''}", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
             f"{torch.get_num_threads()} torch threads; fp32 matmul peak {peak:.0f} GFLOP/s "
             "(torch, measured in this run).", ""]
    if small:
        lines += goal_rows(speedups(small)) + [""] + timing_rows(small, peak) + cache_table(small)
        lines += ["", "Decode peak RSS (fresh process; 'decoding' = above the peak after loading):", "",
                  "| frames | impl | peak RSS MB | decoding MB |", "|---:|---|---:|---:|"]
        lines += [f"| {r['frames']} | {r['impl']} | {r['peak_rss_mb']:.0f} | {r['decode_rss_mb']:.0f} |"
                  for r in small if "peak_rss_mb" in r]
        lines += ["", "DiT step scaling (batch 2):", "", "| model | attention | frames | size | tokens | GFLOP | ms |",
                  "|---|---|---:|---|---:|---:|---:|"]
        for r in small:
            if "scaling" in r:
                ms = f"{r['median_ms']:.1f}" if r["median_ms"] is not None else "analytic"
                lines.append(f"| {r.get('model', cfg.name)} | {r['scaling']} | {r['frames']} | "
                             f"{r['width']}x{r['height']} | {r['tokens']} | {r['gflop']:.1f} | {ms} |")
    if wan:
        v = wan_width.VIDEO
        lines += ["", f"## {wan_width.MODEL}: {v['frames']}x{v['height']}x{v['width']}, {wan_width.STEPS} steps, "
                  "CFG", ""] + goal_rows(wan_width.goals(wan)) + [""] + timing_rows(wan, peak)
        lines += [f"| end_to_end | {r['impl']} | PSNR vs diffusers {r['psnr_vs_diffusers_db']:.1f} dB"
                  + (f", vs fp32 {r['psnr_vs_fp32_db']:.1f} dB" if "psnr_vs_fp32_db" in r else "") + " | | | | |"
                  for r in wan if "psnr_vs_diffusers_db" in r]
        lines += cache_table(wan)
        lines += ["", "Where one DiT step's time goes (share of operator time):", ""]
        lines += [f"- {r['impl']}: " + ", ".join(f"{k} {v:.0%}" for k, v in r["profile"].items())
                  for r in wan if "profile" in r]
        lines += [f"- {r['impl']} end to end: " + ", ".join(f"{k} {v:.0f} ms" for k, v in r["breakdown_ms"].items())
                  for r in wan if "breakdown_ms" in r]
        a = next((r for r in wan if r["impl"] == "analytic-30-layers"), None)
        if a:
            lines += ["", f"FLOPs per step (batch 2): one layer {a['per_layer_gflop']:.1f} GFLOP, shared "
                      f"{a['shared_gflop']:.1f}, the --text-kv context {a['context_gflop']:.1f}; at 30 layers "
                      f"{a['step_30_layers_gflop']:.0f} GFLOP a step, {a['context_30_layers_gflop']:.0f} of it "
                      "the context."]
        proj = [r for r in wan if r["impl"] == "projection"]
        if proj:
            lines += ["", "Projection for the released models (FLOPs of one step, CFG, counted through diffusers' "
                      "class on the meta device; time at the H100/H200 dense peak, i.e. 100% utilization):", "",
                      "| model | video | tokens | TFLOP / step | attention share | ms at bf16 989 TFLOP/s | "
                      "ms at fp8 1979 TFLOP/s |", "|---|---|---:|---:|---:|---:|---:|"]
            lines += [f"| {r['model']} | {r['frames']}x{r['height']}x{r['width']} ({r['resolution']}) | {r['tokens']} | "
                      f"{r['step_tflop']:.0f} | {r['attention_share']:.0%} | {r['bf16_peak_ms']:.0f} | "
                      f"{r['fp8_peak_ms']:.0f} |" for r in proj]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    if small:
        plot(small, out / "results.png")


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    timing = [r for r in records if r.get("median_ms") and "scaling" not in r and "peak_rss_mb" not in r]
    stages = list(dict.fromkeys(r["stage"] for r in timing))
    impls = list(dict.fromkeys(r["impl"] for r in timing))
    for k, impl in enumerate(impls):
        ys = [next((r["median_ms"] for r in timing if r["stage"] == s and r["impl"] == impl), 0) for s in stages]
        axes[0].bar(np.arange(len(stages)) + k / (len(impls) + 1), ys, width=1 / (len(impls) + 1), label=impl)
    axes[0].set_xticks(np.arange(len(stages)) + 0.4, stages)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("median ms (log)")
    axes[0].legend(fontsize=7)
    for attention in ("factorized", "full"):
        pts = sorted((r["tokens"], r["gflop"]) for r in records if r.get("scaling") == attention)
        axes[1].loglog(*zip(*pts), "o-", label=attention)
    axes[1].set_xlabel("tokens per frame x frames")
    axes[1].set_ylabel("DiT step GFLOP (batch 2)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


HELP = """Time every stage in PyTorch / diffusers and in the runtime; write results.json/.md(/.png).

\b
Parts (--part; default: all):
  small  the project's model (--preset), its fp32/fp16/int8 artifacts built first unless
         --artifacts is given, and an fp32 --text-kv build unless --kv-artifacts is given
         (about 3 minutes more; --no-kv skips it); step caching on four references
  wan    a Wan2.1-1.3B-shaped transformer (2 of 30 layers, random weights) against diffusers:
         builds it plain and with --text-kv (both --fused-attention) at fp32 + int8, then
         times the DiT step, the context graph and end to end (6 steps, 17x128x128), with
         operator profiles; 8 to 10 minutes on 2 cores (measured), a progress bar on stderr
"""


@click.command(help=HELP)
@click.option("--part", type=click.Choice(["all", "small", "wan"]), default="all", show_default=True,
              help="Which part to run (see above).")
@click.option("--preset", default="small", show_default=True, help="The small part's preset.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for results.json/.md/.png.")
@click.option("--artifacts", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The small part: an artifact directory of the preset (default: built into a temporary "
                   "folder with fp32, fp16 and int8).")
@click.option("--kv-artifacts", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The small part: a --text-kv artifact directory of the preset (default: built, fp32).")
@click.option("--kv/--no-kv", default=True, show_default=True,
              help="The small part: also time the --text-kv step, its context call and end to end.")
@click.option("--runs", default=5, show_default=True, help="Timed runs per measurement (after warm-up).")
@click.option("--wan-runs", default=3, show_default=True, help="Timed runs per measurement in the wan part.")
@click.option("--compile/--no-compile", "compile_", default=True, show_default=True,
              help="Also time torch.compile (inductor needs a C++ compiler).")
@click.option("--rss-frames", default="17,33,65", show_default=True, help="Clip lengths for decode memory.")
def main(part, preset, out, artifacts, kv_artifacts, kv, runs, wan_runs, compile_, rss_frames):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if kv_artifacts is not None and not kv:
        raise click.UsageError("--kv-artifacts and --no-kv contradict each other")
    if kv_artifacts is not None:  # before minutes of building
        try:
            stages = load_manifest(kv_artifacts, verify="none").stages
        except WanError as exc:
            raise click.UsageError(f"--kv-artifacts: {exc}") from None
        if CONTEXT_STAGE not in stages:
            raise click.UsageError(f"--kv-artifacts {kv_artifacts} was not built with --text-kv")
    cfg = get_preset(preset)
    out.mkdir(parents=True, exist_ok=True)
    frames = tuple(int(f) for f in rss_frames.split(","))
    peak = matmul_peak_gflops()
    log.info("matmul peak: %.0f GFLOP/s", peak)
    records: list[dict] = []
    if part in ("all", "small"):
        from export.build import build_artifacts

        with tempfile.TemporaryDirectory() as tmp:
            if artifacts is None:
                artifacts = Path(tmp) / preset
                build_artifacts(cfg, artifacts, precisions=("fp32", "fp16", "int8"))
            if kv and kv_artifacts is None:
                kv_artifacts = Path(tmp) / f"{preset}-kv"
                build_artifacts(cfg, kv_artifacts, text_kv=True)
            records += run(cfg, artifacts, runs, compile_, frames, peak, kv_artifacts)  # None with --no-kv
    if part in ("all", "wan"):
        from tqdm import tqdm

        with tqdm(total=8, desc="wan part", unit="phase") as bar:
            def progress(done: str) -> None:
                bar.set_postfix_str(done)
                bar.update(1)

            records += wan_width.run(wan_runs, compile_, peak, progress)
    write_report(records, out, cfg)
    click.echo(f"wrote {out / 'results.json'}, results.md" + (", results.png" if part != "wan" else ""))


if __name__ == "__main__":
    main()
