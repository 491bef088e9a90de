"""`wan-export` as a library call: reference model -> validated ONNX stages -> artifact directory.

    fp32     every stage exported from PyTorch and checked against it (two shapes); the DiT
             also with ONNX Runtime's fused kernels (an ORT-only graph, export/kernels.py).
             `text_kv`: the reference's cross-attention K/V as a context stage run once per
             video (`dit_context`), the DiT step taking them as an input
    fp16     mixed precision with fp32 islands (engines/fp16.py)
    int8     Q/DQ from calibration on real denoising trajectories (engines/int8.py)
    engines  a TensorRT .plan per stage and precision (engines/tensorrt.py)

Reduced precisions are measured against fp32 on held-out trajectories; where a reduced VAE
costs the video its quality bar, the VAE stages keep their fp32 graph and the manifest says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import platform
import time
from pathlib import Path

import onnx
import torch

from engines import fp16, graph, int8, quality
from engines.artifacts import ArtifactWriter
from engines.tensorrt import EngineOptions, build_engine, resolve_flavour, symbol_profile
from export.calibration import CalibrationConfig, capture, reference_image
from export.config import ModelConfig
from export.dit import WanDiT, stage_view
from export.kernels import CONTRIB_DOMAIN, CONTRIB_OPS, ONNX_RUNTIME, onnx_runtime_translations
from export.onnx_export import DEFAULT_OPSET, export_stage, validate_stage
from export.vae import (VAEDecoderFirstStage, VAEDecoderStage, VAEDecoderStepStage, VAEEncoderStage,
                        decoder_cache_layout)
from export.weights import build_models, default_checkpoint
from runtime.backends import OnnxRuntimeBackend, available_providers
from runtime.errors import WanError, raise_if_terminated
from runtime.manifest import PRECISIONS, Artifact, Manifest, Stage, sha256_file
from runtime.pipeline import Pipeline
from runtime.stages import CONTEXT_STAGE, STAGE_NAMES, STREAM_STAGE_NAMES, stage_specs, stream_decoder_specs

log = logging.getLogger(__name__)

VAE_STAGES = ("vae_encoder", "vae_decoder")
# The DiT's ONNX Runtime graph (fused contrib ops), built at the precisions a CPU runs well;
# fp16 is for GPUs, where TensorRT builds from the portable graph.
ORT_GRAPH = "onnx/{precision}/dit.ort.onnx"
ORT_GRAPH_PRECISIONS = ("fp32", "int8")
ORT_GRAPH_OPS = [f"{CONTRIB_DOMAIN}.{op}" for op in CONTRIB_OPS]
FP16_EMULATION_NOTE = ("measured on the CPU through fp32 graphs that round every fp16 tensor "
                       "(engines/fp16.py emulate): fp16 storage, fp32 arithmetic")
RANGE_SAMPLES = 24  # DiT calls used to measure activation ranges for fp16 (spread over steps)


def tool_versions(opset: int) -> dict[str, str]:
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "opset": str(opset),
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def build_artifacts(cfg: ModelConfig, out: str | Path, checkpoint: str | Path | None = None,
                    force: bool = False, opset: int = DEFAULT_OPSET,
                    precisions: tuple[str, ...] = ("fp32",),
                    int8_float_layers: tuple[str, ...] | None = None,
                    engines: EngineOptions | None = None, text_kv: bool = False) -> Manifest:
    """Export, validate and write `cfg`'s stages at `precisions` to the directory `out`.
    `text_kv`: the reference K/V computed once per video by a context stage (`dit_context`).

    Raises WanError when a stage or a precision misses its bar; nothing is left at `out` then.
    """
    cfg.validate()
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise WanError(f"precision {unknown[0]!r} is not one of {', '.join(PRECISIONS)}")
    precisions = tuple(p for p in PRECISIONS if p in precisions or p == "fp32")  # fp32 is the base
    if engines is not None:
        resolve_flavour(engines.flavour)  # fail before the slow work
        for batch in {s.batch for s in stage_specs(cfg.geometry, kv_dims(cfg, text_kv)).values()}:
            symbol_profile(engines, cfg.geometry, batch, cfg.symbol_ranges())  # only the batch differs
    with ArtifactWriter(out, force) as writer:  # checks `out` before any slow work
        vae, dit = build_models(cfg, checkpoint)
        stages = export_fp32(cfg, vae, dit, writer, opset, text_kv)
        model = cfg.to_dict()
        manifest = Manifest(
            model=model, geometry=cfg.geometry,
            latent_mean=tuple(vae.latent_mean.tolist()), latent_std=tuple(vae.latent_std.tolist()),
            sampler=model["sampler"], video=model["video"],
            symbols=cfg.symbol_ranges(), stages=stages,
            files={},  # filled in by the writer, which hashes what it wrote
            tools=tool_versions(opset),
            weights=weights_record(cfg, checkpoint),
        )
        reduced = [p for p in precisions if p != "fp32"]
        if "int8" in reduced and int8_float_layers:
            check_float_layers(writer.staging, stages, int8_float_layers)
        if reduced:
            calib = CalibrationConfig()
            t0 = time.perf_counter()
            samples = capture(vae, dit, cfg, calib.seeds)
            holdout = capture(vae, dit, cfg, calib.holdout_seeds)
            if text_kv:  # the step graph's inputs are then latent, timestep and ref_kv
                samples, holdout = with_reference_kv(dit, samples), with_reference_kv(dit, holdout)
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


def weights_record(cfg: ModelConfig, checkpoint: str | Path | None) -> dict:
    """Where the exported weights came from, for the manifest."""
    path = Path(checkpoint) if checkpoint is not None else default_checkpoint(cfg)
    if path is None:
        return {"source": "seeded initialization", "seed": cfg.seed}
    return {"source": "checkpoint" if checkpoint is not None else "bundled", "path": str(path),
            "sha256": sha256_file(path)}


def kv_dims(cfg: ModelConfig, text_kv: bool) -> tuple[int, int] | None:
    """What `stage_specs` needs for a --text-kv build (the DiT's layers and dim), else None."""
    return (cfg.dit.num_layers, cfg.dit.dim) if text_kv else None


def export_fp32(cfg: ModelConfig, vae, dit, writer: ArtifactWriter, opset: int,
                text_kv: bool = False) -> dict[str, Stage]:
    """The three stages plus the streaming decoder's two (and with `text_kv` the context stage),
    exported and checked against PyTorch, and the DiT step once more with ONNX Runtime's fused
    kernels (export/kernels.py)."""
    fused_dit = WanDiT(cfg.dit, cfg.vae.z_dim, kernels=ONNX_RUNTIME).eval()
    fused_dit.load_state_dict(dit.state_dict())
    step, fused_step = (stage_view(dit, "step"), stage_view(fused_dit, "step")) if text_kv else (dit, fused_dit)
    modules = {"vae_encoder": VAEEncoderStage(vae), "dit": step, "vae_decoder": VAEDecoderStage(vae),
               "vae_decoder_first": VAEDecoderFirstStage(vae), "vae_decoder_step": VAEDecoderStepStage(vae)}
    if text_kv:
        modules[CONTEXT_STAGE] = stage_view(dit, "reference_kv")
    specs = {**stage_specs(cfg.geometry, kv_dims(cfg, text_kv)),
             **stream_decoder_specs(cfg.geometry, decoder_cache_layout(vae))}
    graphs = []  # (stage, module, path, custom-op translations)
    for name in specs:
        graphs.append((name, modules[name], f"onnx/fp32/{name}.onnx", None))
        if name == "dit":
            graphs.append((name, fused_step, ORT_GRAPH.format(precision="fp32"), onnx_runtime_translations()))
    symbols = cfg.symbol_ranges()
    stages: dict[str, Stage] = {}
    for i, (name, module, rel, translations) in enumerate(graphs, 1):
        label = f"[{i}/{len(graphs)}] {name}" + (" (ONNX Runtime kernels)" if translations else "")
        check = export_checked(label, module, specs[name], symbols, writer.path(rel), opset, translations)
        if translations is None:
            stages[name] = Stage(specs[name], {"fp32": Artifact("fp32", rel, check)})
        else:
            art = stages[name].artifacts["fp32"]
            stages[name].artifacts["fp32"] = dataclasses.replace(
                art, ort_graph={"path": rel, "validation": check, "ops": ORT_GRAPH_OPS})
    return stages


def with_reference_kv(dit: WanDiT, samples: dict) -> dict:
    """Calibration samples of a `text_kv` build: the DiT calls' (ref_latent, motion) become
    `dit_context`'s samples and, through the PyTorch context stage, the step's `ref_kv` (one
    array per trajectory, shared by its calls)."""
    context, steps, kv = [], [], {}
    for call in samples["dit"]:
        key = (call["ref_latent"].tobytes(), call["motion"].tobytes())
        if key not in kv:
            context.append({"ref_latent": call["ref_latent"], "motion": call["motion"]})
            with torch.no_grad():
                kv[key] = dit.reference_kv(*(torch.from_numpy(a) for a in context[-1].values())).numpy()
        steps.append({"latent": call["latent"], "timestep": call["timestep"], "ref_kv": kv[key]})
    return {**samples, "dit": steps, CONTEXT_STAGE: context}


def export_checked(label: str, module, spec, symbols, path: Path, opset: int,
                   translations: dict | None = None) -> dict:
    """Export one graph, check it against PyTorch at two shapes, and refuse it over tolerance:
    the one export step of every model family. Returns the validation record."""
    raise_if_terminated()
    t0 = time.perf_counter()
    log.info("%s: exporting", label)
    export_stage(module, spec, symbols, path, opset, translations)
    check = validate_stage(module, spec, path)
    log.info("%s: max abs err %.2e, rel %.2e (tolerance %.0e) in %.1f s", label, check["max_abs"],
             check["max_rel"], check["tolerance"], time.perf_counter() - t0)
    if not check["passed"]:
        raise WanError(f"stage {spec.name}: ONNX Runtime differs from PyTorch by {check['max_rel']:.2e} "
                       f"(relative), above the tolerance {check['tolerance']:.0e}; nothing was written")
    return check


def _every(samples: list, n: int) -> list:
    """At most n samples spread evenly (so every part of the trajectory is represented)."""
    step = max(1, len(samples) // n)
    return samples[::step][:n]


def check_float_layers(root: Path, stages: dict[str, Stage], patterns: tuple[str, ...]) -> None:
    """Refuse an --int8-float-layers pattern that matches no layer to quantize in any stage
    (a typo would otherwise silently quantize everything)."""
    models = {n: onnx.load(str(root / stages[n].artifacts["fp32"].path), load_external_data=False)
              for n in STAGE_NAMES}
    for pattern in patterns:
        if not any(graph.nodes_matching(m, [pattern], op_types=int8.QUANT_OPS) for m in models.values()):
            raise WanError(f"--int8-float-layers {pattern!r} matches no quantizable layer; module paths "
                           "look like 'blocks.0.ffn*', 'blocks.*.attn1' (its fused q/k/v projection), "
                           "'condition_embedder*', 'vae.decoder.head'")


def reduce_graph(precision: str, src: Path, dst: Path, stage: str, samples,
                 float_layers: tuple[str, ...] | None) -> dict:
    """Write the `precision` version of the fp32 graph `src`; returns its recipe details."""
    if precision == "fp16":
        return fp16.convert(src, dst, _every(samples, RANGE_SAMPLES))
    layers = int8.DEFAULT_FLOAT_LAYERS[stage] if float_layers is None else float_layers
    return int8.quantize(src, dst, samples, layers)


def emulating_fp16(precision: str) -> bool:
    """fp16 measured on a CPU-only ONNX Runtime, which would silently run fp16 islands in fp32."""
    return precision == "fp16" and available_providers() == ["CPUExecutionProvider"]


@contextlib.contextmanager
def measurable(manifest: Manifest, root: Path, precision: str):
    """The manifest to measure `precision` with: itself, except for fp16 on a CPU, where the
    fp16 graphs are swapped for fp32 emulations that round every fp16 tensor (engines/fp16.py),
    written next to them for the sessions to load and removed again (never shipped)."""
    if not emulating_fp16(precision):
        yield manifest
        return
    stages, written = dict(manifest.stages), []
    for name in manifest.stages:
        art = stages[name].artifacts[precision]
        if not art.path.startswith(f"onnx/{precision}/"):
            continue  # kept fp32
        rel = art.path.removesuffix(".onnx") + ".emulated.onnx"
        fp16.emulate(root / art.path, root / rel)
        written += [root / rel, root / f"{rel}.data"]
        stages[name] = dataclasses.replace(
            stages[name], artifacts={**stages[name].artifacts, precision: dataclasses.replace(art, path=rel)})
    try:
        yield dataclasses.replace(manifest, stages=stages)
    finally:
        for path in written:
            path.unlink(missing_ok=True)


def portable_stages(root: Path, manifest: Manifest, precision: str, opened: dict) -> dict:
    """Sessions of the portable graphs (what TensorRT builds) at `precision`: `opened` (a
    backend's stages) where it already runs them, i.e. where no stage has an ONNX Runtime graph."""
    if all(manifest.stages[n].artifacts[precision].ort_graph is None for n in STAGE_NAMES):
        return opened
    return OnnxRuntimeBackend(root, manifest, precision, contrib_ops=False).stages


def build_reduced(precision: str, manifest: Manifest, root: Path, samples, holdout,
                  calib: CalibrationConfig, float_layers: tuple[str, ...] | None) -> dict:
    """Write `precision` graphs for every stage, measure them, fall back to fp32 VAE stages if
    the reduced VAE misses the end-to-end bar. Returns the quality record."""
    t0 = time.perf_counter()
    for name in STAGE_NAMES:
        fp32 = manifest.stages[name].artifacts["fp32"]
        rel = f"onnx/{precision}/{name}.onnx"
        details = reduce_graph(precision, root / fp32.path, root / rel, name, samples[name], float_layers)
        ort_graph = None
        if fp32.ort_graph is not None and precision in ORT_GRAPH_PRECISIONS:
            ort_rel = ORT_GRAPH.format(precision=precision)
            reduce_graph(precision, root / fp32.ort_graph["path"], root / ort_rel, name, samples[name],
                         float_layers)
            ort_graph = {"path": ort_rel, "validation": {}, "ops": ORT_GRAPH_OPS}
        manifest.stages[name].artifacts[precision] = Artifact(precision, rel, {}, details, ort_graph=ort_graph)
    kept = {**{n: "the streaming decoder runs in fp32" for n in STREAM_STAGE_NAMES},  # small per-frame graphs
            CONTEXT_STAGE: "the reference K/V are computed once per video, in fp32"}
    for name, reason in kept.items():  # fp32 at every precision
        if name in manifest.stages:
            fp32 = manifest.stages[name].artifacts["fp32"]
            manifest.stages[name].artifacts[precision] = Artifact(
                precision, fp32.path, fp32.validation, {"kept": "fp32", "reason": reason})

    # What wan-run runs (ONNX Runtime graphs where built), and the portable graphs TensorRT builds.
    fp32_pipe = Pipeline.for_manifest(root, manifest, OnnxRuntimeBackend(root, manifest, "fp32"))
    images = [reference_image(s, manifest.video["height"], manifest.video["width"])
              for s in calib.holdout_seeds]
    seeds = list(calib.holdout_seeds)

    fp32_portable = portable_stages(root, manifest, "fp32", fp32_pipe.stages)

    def measure() -> tuple[Pipeline, dict, dict]:
        """The reduced pipeline, its portable stage sessions and its end-to-end quality: the
        graphs (fp16 emulations on a CPU) are written and opened once per measurement."""
        with measurable(manifest, root, precision) as m:
            pipe = Pipeline.for_manifest(root, m, OnnxRuntimeBackend(root, m, precision))
            portable = portable_stages(root, m, precision, pipe.stages)
        return pipe, portable, quality.end_to_end(fp32_pipe, pipe, images, seeds)

    pipe, portable, e2e = measure()
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
        pipe, portable, e2e = measure()
    metric = "max_abs / max|fp32|, held-out inputs"
    for name in STAGE_NAMES:
        held = _every(holdout[name], 12)
        art = manifest.stages[name].artifacts[precision]
        err = quality.stage_error(fp32_portable[name], portable[name], held)
        ort_graph = art.ort_graph
        if ort_graph is not None:
            ort_err = quality.stage_error(fp32_pipe.stages[name], pipe.stages[name], held)
            ort_graph = {**ort_graph, "validation": {**ort_err, "metric": metric}}
        manifest.stages[name].artifacts[precision] = dataclasses.replace(
            art, validation={**err, "metric": metric}, ort_graph=ort_graph)
    record = {
        "psnr_db": e2e["psnr_db"], "psnr_db_each": e2e["psnr_db_each"], "bar_db": bar,
        "finite": e2e["finite"], "vae": vae_note,
        # the graphs wan-run runs: the ONNX Runtime graph where there is one
        "stage_max_rel": {n: (a.ort_graph or {"validation": a.validation})["validation"]["max_rel"]
                          for n in STAGE_NAMES for a in [manifest.stages[n].artifacts[precision]]},
        "providers": available_providers(),
        **({"note": FP16_EMULATION_NOTE} if emulating_fp16(precision) else {}),
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
                symbols = symbol_profile(opts, manifest.geometry, manifest.stages[name].spec.batch, manifest.symbols)
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
