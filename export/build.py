"""`wan-export` as a library call: reference model -> validated ONNX stages -> artifact directory.

    fp32     every stage exported from PyTorch and checked against it (two shapes)
    fp16     mixed precision with fp32 islands (engines/fp16.py)
    int8     Q/DQ from calibration on real denoising trajectories (engines/int8.py)
    engines  a TensorRT .plan per stage and precision (engines/tensorrt.py)

Reduced precisions are measured against fp32 on held-out trajectories; where a reduced VAE
costs the video its quality bar, the VAE stages keep their fp32 graph and the manifest says so.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from pathlib import Path

import onnx
import torch

from engines import fp16, int8, quality
from engines.artifacts import ArtifactWriter
from engines.tensorrt import EngineOptions, build_engine, resolve_flavour, symbol_profile
from export.calibration import CalibrationConfig, capture, reference_image
from export.config import ModelConfig
from export.onnx_export import DEFAULT_OPSET, export_stage, validate_stage
from export.vae import (VAEDecoderFirstStage, VAEDecoderStage, VAEDecoderStepStage, VAEEncoderStage,
                        decoder_cache_layout)
from export.weights import build_models
from runtime.backends import OnnxRuntimeBackend
from runtime.errors import WanError
from runtime.manifest import PRECISIONS, Artifact, Manifest, Stage
from runtime.pipeline import Pipeline
from runtime.stages import STAGE_NAMES, STREAM_STAGE_NAMES, stage_specs, stream_decoder_specs

log = logging.getLogger(__name__)

VAE_STAGES = ("vae_encoder", "vae_decoder")
RANGE_SAMPLES = 24  # DiT calls used to measure activation ranges for fp16 (spread over steps)


def tool_versions(opset: int) -> dict[str, str]:
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "opset": str(opset),
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def build_artifacts(cfg: ModelConfig, out: str | Path, checkpoint: str | Path | None = None,
                    force: bool = False, opset: int = DEFAULT_OPSET,
                    precisions: tuple[str, ...] = ("fp32",),
                    int8_float_layers: tuple[str, ...] | None = None,
                    engines: EngineOptions | None = None) -> Manifest:
    """Export, validate and write `cfg`'s stages at `precisions` to the directory `out`.

    Raises WanError when a stage or a precision misses its bar; nothing is left at `out` then.
    """
    cfg.validate()
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise WanError(f"precision {unknown[0]!r} is not one of {', '.join(PRECISIONS)}")
    precisions = tuple(p for p in PRECISIONS if p in precisions or p == "fp32")  # fp32 is the base
    if engines is not None:
        resolve_flavour(engines.flavour)  # fail before the slow work
        for name in (*STAGE_NAMES, *STREAM_STAGE_NAMES):
            symbol_profile(engines, cfg.geometry, name, cfg.symbol_ranges())
    with ArtifactWriter(out, force) as writer:  # checks `out` before any slow work
        vae, dit = build_models(cfg, checkpoint)
        stages = export_fp32(cfg, vae, dit, writer, opset)
        model = cfg.to_dict()
        manifest = Manifest(
            model=model, geometry=cfg.geometry,
            latent_mean=tuple(vae.latent_mean.tolist()), latent_std=tuple(vae.latent_std.tolist()),
            sampler=model["sampler"], video=model["video"],
            symbols=cfg.symbol_ranges(), stages=stages,
            files={},  # filled in by the writer, which hashes what it wrote
            tools=tool_versions(opset),
        )
        reduced = [p for p in precisions if p != "fp32"]
        if reduced:
            calib = CalibrationConfig()
            t0 = time.perf_counter()
            samples = capture(vae, dit, cfg, calib.seeds)
            holdout = capture(vae, dit, cfg, calib.holdout_seeds)
            log.info("calibration: %d trajectories (%d DiT calls) + %d held out in %.1f s",
                     len(calib.seeds), len(samples["dit"]), len(calib.holdout_seeds),
                     time.perf_counter() - t0)
            calibration = {**calib.to_dict(cfg), "dit_calls": len(samples["dit"])}
            for p in reduced:
                manifest.quality[p] = build_reduced(p, manifest, writer.staging, samples, holdout,
                                                    calib, int8_float_layers)
            manifest = dataclasses.replace(manifest, calibration=calibration)
        if engines is not None:
            build_engines(manifest, writer.staging, engines, precisions)
            manifest.tools.update(engine_tools(manifest))
        return writer.commit(manifest)


def export_fp32(cfg: ModelConfig, vae, dit, writer: ArtifactWriter, opset: int) -> dict[str, Stage]:
    """The three stages plus the streaming decoder's two, exported and checked against PyTorch."""
    modules = {"vae_encoder": VAEEncoderStage(vae), "dit": dit, "vae_decoder": VAEDecoderStage(vae),
               "vae_decoder_first": VAEDecoderFirstStage(vae), "vae_decoder_step": VAEDecoderStepStage(vae)}
    specs = {**stage_specs(cfg.geometry),
             **stream_decoder_specs(cfg.geometry, decoder_cache_layout(vae))}
    symbols = cfg.symbol_ranges()
    stages = {}
    for i, name in enumerate(specs, 1):
        rel = f"onnx/fp32/{name}.onnx"
        t0 = time.perf_counter()
        log.info("[%d/%d] %s: exporting", i, len(specs), name)
        export_stage(modules[name], specs[name], symbols, writer.path(rel), opset)
        check = validate_stage(modules[name], specs[name], writer.path(rel))
        log.info("[%d/%d] %s: max abs err %.2e, rel %.2e (tolerance %.0e) in %.1f s",
                 i, len(specs), name, check["max_abs"], check["max_rel"],
                 check["tolerance"], time.perf_counter() - t0)
        if not check["passed"]:
            raise WanError(f"stage {name}: ONNX Runtime differs from PyTorch by "
                           f"{check['max_rel']:.2e} (relative), above the tolerance "
                           f"{check['tolerance']:.0e}; nothing was written")
        stages[name] = Stage(specs[name], {"fp32": Artifact("fp32", rel, check)})
    return stages


def _every(samples: list, n: int) -> list:
    """At most n samples spread evenly (so every part of the trajectory is represented)."""
    step = max(1, len(samples) // n)
    return samples[::step][:n]


def build_reduced(precision: str, manifest: Manifest, root: Path, samples, holdout,
                  calib: CalibrationConfig, float_layers: tuple[str, ...] | None) -> dict:
    """Write `precision` graphs for every stage, measure them, fall back to fp32 VAE stages if
    the reduced VAE misses the end-to-end bar. Returns the quality record."""
    t0 = time.perf_counter()
    for name in STAGE_NAMES:
        src = root / manifest.stages[name].artifacts["fp32"].path
        rel = f"onnx/{precision}/{name}.onnx"
        if precision == "fp16":
            details = fp16.convert(src, root / rel, _every(samples[name], RANGE_SAMPLES))
        else:
            layers = int8.DEFAULT_FLOAT_LAYERS[name] if float_layers is None else float_layers
            details = int8.quantize(src, root / rel, samples[name], layers)
        manifest.stages[name].artifacts[precision] = Artifact(precision, rel, {}, details)
    for name in STREAM_STAGE_NAMES:  # small per-frame graphs: fp32 at every precision
        fp32 = manifest.stages[name].artifacts["fp32"]
        manifest.stages[name].artifacts[precision] = Artifact(
            precision, fp32.path, fp32.validation, {"kept": "fp32", "reason": "the streaming decoder runs in fp32"})

    fp32_pipe = Pipeline(root, manifest, OnnxRuntimeBackend(root, manifest, "fp32"))
    images = [reference_image(s, manifest.video["height"], manifest.video["width"])
              for s in calib.holdout_seeds]
    seeds = list(calib.holdout_seeds)

    def measure() -> tuple[Pipeline, dict]:
        pipe = Pipeline(root, manifest, OnnxRuntimeBackend(root, manifest, precision))
        return pipe, quality.end_to_end(fp32_pipe, pipe, images, seeds)

    pipe, e2e = measure()
    bar = quality.PSNR_BARS_DB[precision]
    vae_note = f"{precision}"
    if not (e2e["finite"] and e2e["psnr_db"] >= bar):
        reduced_psnr = e2e["psnr_db"]
        for name in VAE_STAGES:
            fp32 = manifest.stages[name].artifacts["fp32"]
            manifest.stages[name].artifacts[precision] = Artifact(
                precision, fp32.path, {}, {"kept": "fp32", "reason":
                                           f"{precision} VAE gave {reduced_psnr:.1f} dB end to end, below {bar:g} dB"})
        vae_note = f"fp32 ({precision} VAE: {reduced_psnr:.1f} dB < {bar:g} dB)"
        pipe, e2e = measure()
    for name in STAGE_NAMES:
        err = quality.stage_error(fp32_pipe.stages[name], pipe.stages[name], _every(holdout[name], 12))
        art = manifest.stages[name].artifacts[precision]
        manifest.stages[name].artifacts[precision] = Artifact(
            precision, art.path, {**err, "metric": "max_abs / max|fp32|, held-out inputs"}, art.details)
    record = {
        "psnr_db": e2e["psnr_db"], "psnr_db_each": e2e["psnr_db_each"], "bar_db": bar,
        "finite": e2e["finite"], "vae": vae_note,
        "stage_max_rel": {n: manifest.stages[n].artifacts[precision].validation["max_rel"]
                          for n in STAGE_NAMES},
        "measured_on": {"seeds": seeds, "frames": manifest.video["frames"],
                        "height": manifest.video["height"], "width": manifest.video["width"],
                        "steps": manifest.sampler["steps"]},
    }
    log.info("%s: end-to-end PSNR vs fp32 %.1f dB (bar %g), VAE %s, stage rel err %s, in %.1f s",
             precision, e2e["psnr_db"], bar, vae_note,
             ", ".join(f"{n} {v:.1e}" for n, v in record["stage_max_rel"].items()),
             time.perf_counter() - t0)
    if not e2e["finite"]:
        raise WanError(f"{precision}: the {precision} build produced NaN/Inf; nothing was written")
    if e2e["psnr_db"] < bar:
        raise WanError(f"{precision}: end-to-end PSNR vs fp32 is {e2e['psnr_db']:.1f} dB, below the "
                       f"bar of {bar:g} dB; nothing was written (try --int8-float-layers)")
    return record


def build_engines(manifest: Manifest, root: Path, opts: EngineOptions, precisions) -> None:
    """A TensorRT engine for every stage and precision (a stage whose reduced precision kept
    the fp32 graph gets the fp32 engine)."""
    cache = opts.timing_cache or root / "engines" / "timing.cache"
    built: dict[str, dict] = {}  # graph path -> engine: a graph reused across precisions is built once
    for p in precisions:
        for name in manifest.stages:
            art = manifest.stages[name].artifacts[p]
            if art.path not in built:
                plan = f"engines/{p}/{name}.plan"
                log.info("[tensorrt] %s %s", p, name)
                symbols = symbol_profile(opts, manifest.geometry, name, manifest.symbols)
                built[art.path] = {"path": plan, **build_engine(
                    root / art.path, root / plan, manifest.stages[name].spec, symbols, opts, Path(cache))}
            manifest.stages[name].artifacts[p] = dataclasses.replace(art, engine=built[art.path])
    lock = Path(cache).with_name(Path(cache).name + ".lock")  # Polygraphy's, not an artifact
    lock.unlink(missing_ok=True)


def engine_tools(manifest: Manifest) -> dict[str, str]:
    engine = next(a.engine for s in manifest.stages.values() for a in s.artifacts.values() if a.engine)
    return {"tensorrt_flavour": engine["builder"]["flavour"],
            "tensorrt": engine["builder"]["version"],
            "compute_capabilities": ",".join(engine["compute_capabilities"])}
