"""`wan-export --model DIR`: a released Wan checkpoint -> validated ONNX stages -> artifact directory.

The same machinery as the seed family's build (export/build.py): every graph goes through
`export_checked` (exported from its StageSpec, checked against PyTorch at two shapes), the
artifact writer, TensorRT engines. What differs lives here: the modules are diffusers' and
transformers' own, loaded one component at a time and freed after its stages are written, so
the export holds about one copy of the weights beside the exporter's own; the tokenizer file
and the scheduler config travel in the artifact directory for the runtime.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import importlib.metadata
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines import fp16, int8, quality
from engines.artifacts import ArtifactWriter
from engines.tensorrt import EngineOptions, resolve_flavour, symbol_profile
from export.build import (FP16_EMULATION_NOTE, RANGE_SAMPLES, _every, build_engines, emulating_fp16, engine_tools,
                          export_checked, measurable, tool_versions)
from export.kernels import CONTRIB_DOMAIN, onnx_runtime_translations
from export.onnx_export import DEFAULT_OPSET
from export.wan import known
from export.wan import stages as wan_stages_module
from export.wan.checkpoint import (MAX_SEQUENCE_LENGTH, WanCheckpoint, load_image_encoder, load_text_encoder,
                                   load_transformer, load_vae, read_checkpoint)
from export.wan.stages import (CLIPStage, ContextStage, DecoderFirstStage, DecoderStepStage, DiTStage,
                               EncoderChunkStage, ImageEncoderStage, KVDiTStage, TextEncoderStage, WanStages,
                               decoder_cache_layout, encoder_cache_layout, ort_attention, wan_geometry)
from runtime.errors import WanError
from runtime.backends import OnnxRuntimeBackend, available_providers
from runtime.errors import NonFiniteError
from runtime.manifest import PRECISIONS, Artifact, Manifest, Stage, load_manifest, sha256_file
from runtime.pipeline import Pipeline
from runtime.stages import SymbolRange

log = logging.getLogger(__name__)

TOKENIZER = "text/tokenizer.json"
MAX_VIDEO_PX = 1280  # the exported range: every release's sizes (720p is 1280x720 / 1280x704)
MAX_VIDEO_FRAMES = 129  # TI2V-5B's 121 frames and more


def defaults(ckpt: WanCheckpoint) -> tuple[dict, dict, str | None]:
    """Sampler and video defaults: the release's recommendations when the folder is one (or a
    fine-tune of one), else diffusers' pipeline defaults (guidance_2: the same as guidance); the
    shift is the scheduler's own."""
    k = known.match(ckpt.transformer, len(ckpt.experts) == 2, ckpt.root.name,
                    ckpt.scheduler.get("flow_shift", ckpt.scheduler.get("shift")))
    shift = ckpt.scheduler.get("flow_shift", ckpt.scheduler.get("shift", 1.0))
    if k is None:
        sampler = {"steps": 50, "guidance": 5.0, "fps": 16}
        video = {"frames": 81, "height": 480, "width": 832}
    else:
        sampler = {"steps": k.steps, "guidance": k.guidance, "fps": k.fps}
        video = {"frames": k.frames, "height": k.height, "width": k.width}
    if len(ckpt.experts) == 2 and k is not None and k.guidance_2 is not None:
        sampler["guidance_2"] = k.guidance_2  # the release's; without it the request's guidance, as diffusers
    sampler.update(shift=float(shift), solver=ckpt.scheduler["_class_name"])
    # a checkpoint whose RoPE is shorter than the default video's token grid: the longest it can take
    n, geom = token_limit(ckpt), wan_geometry(ckpt.vae)
    ph, pw = geom.pixels_per_token
    video = {"frames": min(video["frames"], (n - 1) * geom.temporal_stride + 1),
             "height": min(video["height"], n * ph), "width": min(video["width"], n * pw)}
    return sampler, video, (k.name if k else None)


def token_limit(ckpt: WanCheckpoint) -> int:
    """Tokens per axis of the patch grid (latent frames, rows, columns) the transformer's RoPE has
    positions for (diffusers' rope_max_seq_len: 1024 in every release). A longer axis fails inside
    the graph (a Reshape of the RoPE table), so the exported ranges stop there."""
    return int(ckpt.transformer.get("rope_max_seq_len", 1024))


def wan_stages(ckpt: WanCheckpoint, decoder_caches=None, encoder_caches=None, text_kv: bool = False) -> WanStages:
    clip = None
    t = ckpt.transformer
    kv = (t["num_layers"], t["num_attention_heads"] * t["attention_head_dim"]) if text_kv else None
    if ckpt.image_embeddings:
        c = ckpt.image_encoder
        side, patch = c.get("image_size", 224), c.get("patch_size", 32)
        clip = (side, (side // patch) ** 2 + 1, c["hidden_size"])  # patches + the class token
    return WanStages(wan_geometry(ckpt.vae), ckpt.transformer.get("text_dim", 4096), MAX_SEQUENCE_LENGTH,
                     ckpt.condition, len(ckpt.experts), clip,
                     None if decoder_caches is None else tuple(decoder_caches),
                     None if encoder_caches is None else tuple(encoder_caches), kv)


def clip_preprocessing(ckpt: WanCheckpoint) -> dict:
    """CLIPImageProcessor's settings, for the runtime's numpy copy of it (runtime/clip.py)."""
    p, side = ckpt.image_processor, ckpt.image_encoder.get("image_size", 224)
    size = p.get("size", {"shortest_edge": side})
    size = size if isinstance(size, dict) else {"shortest_edge": size}
    return {"size": size, "crop": side, "resample": int(p.get("resample", 3)),
            "rescale": float(p.get("rescale_factor", 1 / 255)) if p.get("do_rescale", True) else 1.0,
            "mean": [float(x) for x in p.get("image_mean", [0.0, 0.0, 0.0])] if p.get("do_normalize", True)
            else [0.0, 0.0, 0.0],
            "std": [float(x) for x in p.get("image_std", [1.0, 1.0, 1.0])] if p.get("do_normalize", True)
            else [1.0, 1.0, 1.0]}


def symbol_ranges(ckpt: WanCheckpoint, video: dict) -> dict[str, SymbolRange]:
    geom, n = wan_geometry(ckpt.vae), token_limit(ckpt)
    ph, pw = geom.pixels_per_token
    return {"B": SymbolRange(1, 2, 8),
            "F": SymbolRange(1, geom.frames_to_latent(video["frames"]),
                             min(geom.frames_to_latent(MAX_VIDEO_FRAMES), n)),
            "Hp": SymbolRange(1, video["height"] // ph, min(MAX_VIDEO_PX // ph, n)),
            "Wp": SymbolRange(1, video["width"] // pw, min(MAX_VIDEO_PX // pw, n))}


def build_wan_artifacts(model_dir: str | Path, out: str | Path, force: bool = False,
                        opset: int = DEFAULT_OPSET, precisions: tuple[str, ...] = ("fp32",),
                        engines: EngineOptions | None = None, reuse: str | Path | None = None,
                        text_kv: bool = False, calibration: "WanCalibration | None" = None,
                        fused_attention: bool = False) -> Manifest:
    """Export a diffusers-layout Wan folder's stages to the artifact directory `out`. `reuse`:
    an artifact directory whose fp32 stages are copied where they came from the same weights,
    code, tools and shape ranges (releases share the VAE and the text encoder). `text_kv`: each
    expert's cross-attention K/V in a context graph run once per video (`dit_context`), the step
    graph taking them. `calibration`: the runs int8 is calibrated and fp16/int8 measured on
    (default: `WanCalibration.for_manifest`, the default video capped at 17x256x256, 20 steps).
    `fused_attention`: each expert's step also as an ONNX Runtime graph with fused attention."""
    ckpt = read_checkpoint(model_dir)  # everything checked before anything is loaded
    previous = reusable(reuse) if reuse is not None else None
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise WanError(f"precision {unknown[0]!r} is not one of {', '.join(PRECISIONS)}")
    precisions = tuple(p for p in PRECISIONS if p in precisions or p == "fp32")  # fp32 is the base
    sampler, video, release = defaults(ckpt)
    symbols = symbol_ranges(ckpt, video)
    geom = wan_geometry(ckpt.vae)
    planned = wan_stages(ckpt, text_kv=text_kv)
    stage_names = planned.names()
    if engines is not None:
        resolve_flavour(engines.flavour)
        for batch in {s.batch for s in planned.specs().values()}:  # (the VAE caches' stages: batch 1)
            symbol_profile(engines, geom, batch, symbols)  # only the batch differs between stages
    log.info("%s: %s (%s%s%s)", ckpt.root, ckpt.pipeline, ckpt.version,
             ", two experts" if len(ckpt.experts) == 2 else "", f", {release}" if release else "")
    with ArtifactWriter(out, force) as writer:
        stages, latent = export_stages(ckpt, writer, symbols, opset, stage_names, previous, text_kv,
                                       fused_attention)
        shutil.copyfile(ckpt.tokenizer_file, writer.path(TOKENIZER))
        manifest = Manifest(
            model={"name": ckpt.root.name, "pipeline": ckpt.pipeline, "version": ckpt.version,
                   "release": release, "transformer": ckpt.transformer, "vae": ckpt.vae,
                   "text_encoder": ckpt.text_encoder},
            geometry=geom, latent_mean=latent[0], latent_std=latent[1], sampler=sampler, video=video,
            symbols=symbols, stages=stages, files={}, tools=tool_versions(opset),
            weights={"source": "diffusers folder", "path": str(ckpt.root)},
            family="wan",
            family_config={
                "text": {"tokenizer": TOKENIZER, "pad_token": ckpt.pad_token, "max_length": MAX_SEQUENCE_LENGTH},
                "scheduler": ckpt.scheduler, "expand_timesteps": ckpt.expand_timesteps,
                "condition": ckpt.condition, "takes_image": ckpt.takes_image, "needs_image": ckpt.needs_image,
                "takes_last_image": ckpt.takes_last_image, "negative_prompt": "", "text_kv": text_kv,
                **({"boundary_ratio": ckpt.boundary_ratio} if len(ckpt.experts) == 2 else {}),
                **({"clip": clip_preprocessing(ckpt)} if ckpt.image_embeddings else {}),
            },
        )
        reduced = [p for p in precisions if p != "fp32"]
        if reduced:
            # The runtime reads only listed files (the tokenizer); the writer lists and hashes
            # them at commit, so the build's own pipelines get the staged names listed now.
            manifest = dataclasses.replace(manifest, files={TOKENIZER: {"sha256": "", "size": 0}})
            calib = calibration or WanCalibration.for_manifest(manifest)
            samples = capture(manifest, writer.staging, calib, calib.seeds)
            manifest = dataclasses.replace(manifest, calibration={
                **calib.to_dict(), "dit_calls": len(samples["dit"]),
                **({"dit_2_calls": len(samples["dit_2"])} if "dit_2" in samples else {})})
            for p in reduced:
                manifest.quality[p] = build_reduced(p, manifest, writer.staging, samples, calib)
        if engines is not None:
            build_engines(manifest, writer.staging, engines, precisions)
            manifest.tools.update(engine_tools(manifest))
        return writer.commit(manifest)


def release_memory() -> None:
    """Collect, and hand freed heap back to the OS (glibc keeps it otherwise: measured 500 MB
    held after the VAE and text-encoder exports of a 1.3B-shaped model, before its DiT)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def reusable(path: str | Path) -> tuple[Path, Manifest]:
    """An artifact directory to copy stages from: a wan one, its files intact."""
    root = Path(path)
    manifest = load_manifest(root)  # integrity-checked, like any artifact directory the runtime loads
    if manifest.family != "wan":
        raise WanError(f"--reuse '{root}' holds the project's own model; it shares no stage with a released one")
    return root, manifest


def component_files(ckpt: WanCheckpoint, component: str) -> list[Path]:
    folder = ckpt.root / component
    return sorted([folder / "config.json", *folder.glob("*.safetensors")])


def stage_sources(ckpt: WanCheckpoint, component_of: dict[str, str], symbols, opset: int) -> dict[str, str]:
    """Each stage's source digest: what its graph is made from. The component's weights and
    config, the pipeline flags that shape its inputs, the code that wraps, exports and checks it,
    the exported shape ranges (min and max: the typical value shapes no graph), opset and tool
    versions. Equal sources make equal graphs: what `--reuse` matches. (Every export records
    them, so each can be reused later; hashing reads the weights once more.)"""
    import export.build
    import export.kernels
    import export.onnx_export
    import export.wan.checkpoint
    import runtime.stages

    code = (wan_stages_module, export.wan.checkpoint, export.onnx_export, export.build, export.kernels,
            runtime.stages)
    shared = {"code": {Path(m.__file__).name: sha256_file(Path(m.__file__)) for m in code},
              "pipeline": {"condition": ckpt.condition, "expand_timesteps": ckpt.expand_timesteps},
              "symbols": {k: [v.min, v.max] for k, v in symbols.items()}, "tools": tool_versions(opset),
              "versions": {m: importlib.metadata.version(m) for m in SOURCE_PACKAGES}}
    weights = {}
    for component in sorted(set(component_of.values())):
        h = hashlib.sha256()
        files = component_files(ckpt, component)
        log.info("hashing %s (%.1f GB): the source digest --reuse matches", component,
                 sum(p.stat().st_size for p in files) / 1e9)
        for path in files:
            h.update(path.name.encode())
            h.update(bytes.fromhex(sha256_file(path)))
        weights[component] = h.hexdigest()
    return {stage: hashlib.sha256(json.dumps({**shared, "stage": stage, "weights": weights[component]},
                                             sort_keys=True).encode()).hexdigest()
            for stage, component in component_of.items()}


# The packages that trace and translate a stage's graph (torch and onnx are in tool_versions).
SOURCE_PACKAGES = ("diffusers", "transformers", "onnxscript", "onnx_ir")


# --fused-attention: the experts' step graphs get a second, ONNX Runtime-only graph with fused
# attention (the portable one is what TensorRT builds and what fp16 runs); the context graphs have
# no attention. Opt-in: it stores the experts' weights a second time (4 bytes a parameter at fp32).
EXPERT_STAGES = ("dit", "dit_2")
ORT_DIT = "onnx/{precision}/{name}.ort.onnx"
ORT_DIT_OPS = [f"{CONTRIB_DOMAIN}.MultiHeadAttention"]


def export_stages(ckpt: WanCheckpoint, writer: ArtifactWriter, symbols, opset: int, stage_names: list[str],
                  previous: tuple[Path, Manifest] | None = None, text_kv: bool = False,
                  fused_attention: bool = False):
    """Each component loaded in turn, its stages exported and checked, then freed; the largest
    first, since what torch keeps after an export raises the floor of every later one. With
    `previous` (--reuse), a component whose stages are all there from the same source is copied
    and never loaded. Returns the stages and the latent normalization (mean, std)."""
    import torch

    count = iter(range(1, len(stage_names) + 1))
    stages: dict[str, Stage] = {}
    latent: list = []
    sources: dict[str, str] = {}

    def export(name: str, module, stage_specs) -> None:
        if name in stages:  # copied (--reuse)
            return
        rel = f"onnx/fp32/{name}.onnx"
        label = f"[{next(count)}/{len(stage_names)}] {name}"
        check = export_checked(label, module.eval(), stage_specs[name], symbols, writer.path(rel), opset)
        ort_graph = None
        if fused_attention and name in EXPERT_STAGES:  # the step again, fused: what ONNX Runtime runs
            torch._dynamo.reset()
            ort_rel = ORT_DIT.format(precision="fp32", name=name)
            with ort_attention():
                ort_check = export_checked(f"{label} (ONNX Runtime kernels)", module, stage_specs[name], symbols,
                                           writer.path(ort_rel), opset, onnx_runtime_translations())
            ort_graph = {"path": ort_rel, "validation": ort_check, "ops": ORT_DIT_OPS}
        stages[name] = Stage(stage_specs[name], {"fp32": Artifact("fp32", rel, check, {"source": sources[name]},
                                                                  ort_graph=ort_graph)})
        torch._dynamo.reset()  # the exporter's traces of this module: not needed for the next one
        release_memory()

    def copy(names: list[str]) -> list[str]:
        """Copy from `previous` those of `names` that are there from the same source; returns
        the others (to export)."""
        if previous is None:
            return names
        root, old = previous
        missing = []
        for name in names:
            stage = old.stages.get(name)
            if stage is None or stage.artifacts["fp32"].details.get("source") != sources[name] or (
                    name in specs and stage.spec.to_dict() != specs[name].to_dict()) or (  # (VAE specs: need the VAE)
                    name in EXPERT_STAGES and (stage.artifacts["fp32"].ort_graph is not None) != fused_attention):
                missing.append(name)
                continue
            art = stage.artifacts["fp32"]
            for rel in (p for graph in (art.path, *([art.ort_graph["path"]] if art.ort_graph else []))
                        for p in (graph, f"{graph}.data")):
                if (root / rel).exists():
                    shutil.copyfile(root / rel, writer.path(rel))
            stages[name] = Stage(stage.spec, {"fp32": Artifact(
                "fp32", art.path, {**art.validation, "reused_from": str(root)}, {"source": sources[name]},
                ort_graph=art.ort_graph)})
            log.info("[%d/%d] %s: copied from %s (same weights, code and tools)", next(count), len(stage_names),
                     name, root)
            if component_of[name] == "vae" and not latent:
                latent.extend([old.latent_mean, old.latent_std])
        return missing

    def vae_stages():
        vae = load_vae(ckpt)
        layout = decoder_cache_layout(vae)
        enc_layout = encoder_cache_layout(vae) if ckpt.condition == "latents" else None
        if not latent:
            latent.extend([tuple(float(x) for x in vae.config.latents_mean),
                           tuple(float(x) for x in vae.config.latents_std)])
        specs = wan_stages(ckpt, layout, enc_layout).specs()
        if ckpt.condition == "first_frame":
            export("vae_encoder", ImageEncoderStage(vae), specs)
        if enc_layout is not None:
            export("vae_encoder_first", EncoderChunkStage(vae, enc_layout, first=True), specs)
            export("vae_encoder_step", EncoderChunkStage(vae, enc_layout, first=False), specs)
        export("vae_decoder_first", DecoderFirstStage(vae, layout), specs)
        export("vae_decoder_step", DecoderStepStage(vae, layout), specs)

    specs = wan_stages(ckpt, text_kv=text_kv).specs()
    extra = tuple(t.name for t in specs["dit"].inputs[3:])  # condition, image (or image_kv)

    def dit_stages(component: str, stage: str) -> None:
        transformer = load_transformer(ckpt, component)
        if text_kv:  # the context graph first: the step's wrapper replaces attn2's processors
            export(f"{stage}_context", ContextStage(transformer), specs)
            export(stage, KVDiTStage(transformer, ckpt.expand_timesteps, extra), specs)
        else:
            export(stage, DiTStage(transformer, ckpt.expand_timesteps, extra), specs)

    components = {
        "vae": vae_stages,
        "text_encoder": lambda: export("text_encoder", TextEncoderStage(load_text_encoder(ckpt)), specs),
        **{component: (lambda component=component, stage=stage: dit_stages(component, stage))
           for component, stage in zip(ckpt.experts, ("dit", "dit_2"))},
        **({"image_encoder": lambda: export("image_encoder", CLIPStage(load_image_encoder(ckpt)), specs)}
           if ckpt.image_embeddings else {}),
    }
    component_of = {n: {"dit": "transformer", "dit_2": "transformer_2", "text_encoder": "text_encoder",
                        "image_encoder": "image_encoder"}.get(n.removesuffix("_context"), "vae")
                    for n in stage_names}
    # (a --text-kv build's DiT differs from a plain one's by its spec, which `copy` compares too)
    sources.update(stage_sources(ckpt, component_of, symbols, opset))
    t0 = time.perf_counter()
    for component in sorted(components, key=lambda c: -weight_bytes(ckpt.root / c)):
        if copy([n for n in stage_names if component_of[n] == component]):
            components[component]()  # exports what was not copied; the module is dropped when this returns
        release_memory()
    log.info("exported %d stages in %.1f s", len(stages), time.perf_counter() - t0)
    return {name: stages[name] for name in stage_names}, tuple(latent)


# --- reduced precision ----------------------------------------------------------------------------

# Which stages each precision reduces. The VAE stays fp32 at every precision, as every released
# Wan runtime keeps it; the text encoder runs once per video, so int8 would save nothing that
# matters and costs T5 accuracy: it stays fp32 there, and gets fp16 with measured-range fp32
# islands (T5's feed-forward activations overflow fp16: the islands are chosen from the ranges
# measured on the calibration prompts).
# A14B's two experts are reduced alike, each calibrated on the steps it serves (the recorder of
# each stage sees only its own calls).
# The context graphs (--text-kv) run once per video too: fp16 halves their weights, int8 keeps them
# fp32 (as it keeps the cross-attentions they hold).
REDUCED_STAGES = {"fp16": ("text_encoder", "dit_context", "dit", "dit_2_context", "dit_2"), "int8": ("dit", "dit_2")}
# Module paths (the wrappers nest diffusers' transformer as `transformer.`) kept out of the
# reduced precision: the DiT's embedders, patch embedding and head, and in int8 its
# cross-attentions, as the seed family's defaults (engines/int8.py) for the same reasons.
FP16_ALWAYS_FP32 = ("transformer.condition_embedder", "transformer.patch_embedding", "transformer.proj_out")
INT8_FLOAT_LAYERS = (*FP16_ALWAYS_FP32, "transformer.blocks.*.attn2")
CALIBRATION_PROMPTS = ("a cat walks along a sunny garden wall", "waves roll onto a sandy beach at sunset",
                       "a red car drives down a city street at night", "snow falls on a quiet mountain village",
                       "a child flies a kite in a green park", "fireworks burst over a river")


@dataclass(frozen=True)
class WanCalibration:
    """Calibration runs: the fp32 runtime on a few prompts and seeds at a small video (every DiT
    call of every step is captured), and held-out prompts/seeds for the quality report."""

    frames: int
    height: int
    width: int
    steps: int
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    holdout_seeds: tuple[int, ...] = (4, 5)
    image: bool = False  # image-to-video: every request gets a calibration image

    @classmethod
    def for_manifest(cls, manifest: Manifest) -> "WanCalibration":
        """The default video, capped so calibration stays minutes on a CPU (17 frames, 256 px)."""
        v, mult = manifest.video, manifest.geometry.pixels_per_token[0]
        cap = lambda n: max(mult, min(n, 256) // mult * mult)  # noqa: E731
        return cls(min(v["frames"], 17), cap(v["height"]), cap(v["width"]), min(manifest.sampler["steps"], 20),
                   image=bool(manifest.family_config.get("needs_image")))

    def request(self, seed: int) -> dict:
        return {"prompt": CALIBRATION_PROMPTS[seed % len(CALIBRATION_PROMPTS)], "frames": self.frames,
                "height": self.height, "width": self.width, "steps": self.steps, "seed": seed,
                **({"image": calibration_image(seed, self.height, self.width)} if self.image else {})}

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "source": "the fp32 runtime's own trajectories",
                "prompts": [self.request(s)["prompt"] for s in self.seeds],
                **({"images": "calibration_image(seed): colour gradients with discs"} if self.image else {})}


def calibration_image(seed: int, height: int, width: int) -> np.ndarray:
    """A seeded uint8 (H, W, 3) picture with some structure (two colour gradients and three
    discs), so an image-to-video model is calibrated on images rather than on noise."""
    rng = np.random.default_rng(1000 + seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    a, b = rng.uniform(0, 255, (2, 3))
    img = a * (1 - x[..., None]) + b * y[..., None]  # (H, W, 3)
    for _ in range(3):
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.25)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


class _Recorder:
    """A stage that keeps a host copy of every input it is called with."""

    def __init__(self, stage):
        self.stage, self.samples = stage, []

    def __call__(self, **inputs):
        self.samples.append({k: np.array(v) for k, v in inputs.items()})
        return self.stage(**inputs)

    def __getattr__(self, name):
        return getattr(self.stage, name)


def capture(manifest: Manifest, root: Path, calib: WanCalibration, seeds) -> dict[str, list]:
    """Stage inputs of the fp32 runtime generating the calibration requests."""
    pipe = Pipeline.for_manifest(root, manifest, OnnxRuntimeBackend(root, manifest, "fp32"))
    stages = sorted({n for names in REDUCED_STAGES.values() for n in names if n in manifest.stages})
    recorders = {n: _Recorder(pipe.stages[n]) for n in stages}
    pipe.stages.update(recorders)
    t0 = time.perf_counter()
    for seed in seeds:
        pipe.generate(**calib.request(seed))
    calls = ", ".join(f"{n} {len(recorders[n].samples)}" for n in ("dit", "dit_2") if n in recorders)
    log.info("calibration: %d prompts, DiT calls %s, in %.1f s", len(seeds), calls, time.perf_counter() - t0)
    return {n: r.samples for n, r in recorders.items()}


def build_reduced(precision: str, manifest: Manifest, root: Path, samples: dict, calib: WanCalibration) -> dict:
    """Write `precision` graphs of the stages it reduces (the others keep their fp32 graph), and
    measure them against fp32 on held-out prompts. Returns the quality record."""
    t0 = time.perf_counter()
    for name, stage in manifest.stages.items():
        fp32 = stage.artifacts["fp32"]
        if name not in REDUCED_STAGES[precision]:
            why = "the VAE stays fp32" if name.startswith("vae") else "runs once per video"
            stage.artifacts[precision] = Artifact(precision, fp32.path, fp32.validation,
                                                  {"kept": "fp32", "reason": why})
            continue
        rel = f"onnx/{precision}/{name}.onnx"
        if precision == "fp16":
            details = fp16.convert(root / fp32.path, root / rel, _every(samples[name], RANGE_SAMPLES),
                                   FP16_ALWAYS_FP32)
        else:
            details = int8.quantize(root / fp32.path, root / rel, samples[name], INT8_FLOAT_LAYERS)
        ort_graph = None
        if fp32.ort_graph is not None and precision == "int8":  # fp16 runs the portable graph
            ort_rel = ORT_DIT.format(precision=precision, name=name)
            int8.quantize(root / fp32.ort_graph["path"], root / ort_rel, samples[name], INT8_FLOAT_LAYERS)
            ort_graph = {**fp32.ort_graph, "path": ort_rel, "validation": {}}
        stage.artifacts[precision] = Artifact(precision, rel, {}, details, ort_graph=ort_graph)
    fp32_pipe = Pipeline.for_manifest(root, manifest, OnnxRuntimeBackend(root, manifest, "fp32"))
    reduced = [n for n in REDUCED_STAGES[precision] if n in manifest.stages]
    held = {n: _Recorder(fp32_pipe.stages[n]) for n in reduced}  # held-out stage inputs
    fp32_pipe.stages.update(held)
    wanted = [fp32_pipe.generate(**calib.request(seed)).frames for seed in calib.holdout_seeds]

    def holdout(m: Manifest):
        """(PSNR per held-out request, all finite, the pipeline) of `m`'s graphs at `precision`."""
        with measurable(m, root, precision) as mm:
            pipe = Pipeline.for_manifest(root, mm, OnnxRuntimeBackend(root, mm, precision))
        scores = []
        for seed, want in zip(calib.holdout_seeds, wanted):
            try:
                scores.append(quality.psnr(want, pipe.generate(**calib.request(seed)).frames))
            except NonFiniteError:
                return scores, False, pipe
        return scores, True, pipe

    scores, finite, pipe = holdout(manifest)
    experts = [n for n in ("dit", "dit_2") if n in manifest.stages]
    per_expert = {}
    if len(experts) == 2:  # each expert reduced alone, the other at fp32: which one costs what
        for name in experts:
            other = next(n for n in experts if n != name)
            stage = manifest.stages[other]
            alone = dataclasses.replace(manifest, stages={**manifest.stages, other: dataclasses.replace(
                stage, artifacts={**stage.artifacts, precision: stage.artifacts["fp32"]})})
            each, ok, _ = holdout(alone)
            per_expert[name] = min(each) if ok and each else float("nan")
    metric = "max_abs / max|fp32|, held-out inputs"
    portable = OnnxRuntimeBackend(root, manifest, precision, contrib_ops=False).stages  # what TensorRT builds
    for name, recorder in held.items():
        inputs = _every(recorder.samples, 12)
        err = quality.stage_error(recorder.stage, portable[name], inputs)
        art = manifest.stages[name].artifacts[precision]
        ort_graph = art.ort_graph and {**art.ort_graph, "validation": {
            **quality.stage_error(recorder.stage, pipe.stages[name], inputs), "metric": metric}}
        manifest.stages[name].artifacts[precision] = dataclasses.replace(
            art, validation={**err, "metric": metric}, ort_graph=ort_graph)
    bar = quality.PSNR_BARS_DB[precision]
    psnr = min(scores) if scores else float("nan")
    record = {
        "psnr_db": psnr, "psnr_db_each": scores, "bar_db": bar, "finite": finite,
        **({"psnr_db_expert_alone": per_expert} if per_expert else {}),
        "vae": "fp32 (the VAE stays fp32 at every precision)",
        "stage_max_rel": {n: (a.ort_graph or {"validation": a.validation})["validation"]["max_rel"]
                          for n in reduced for a in (manifest.stages[n].artifacts[precision],)},
        "providers": available_providers(),
        **({"note": FP16_EMULATION_NOTE} if emulating_fp16(precision) else {}),
        "measured_on": {**{k: v for k, v in calib.request(0).items() if k not in ("prompt", "seed", "image")},
                        "seeds": list(calib.holdout_seeds)},
    }
    log.info("%s: end-to-end PSNR vs fp32 %.1f dB (bar %g), stage rel err %s, in %.1f s", precision, psnr, bar,
             ", ".join(f"{n} {v:.1e}" for n, v in record["stage_max_rel"].items()), time.perf_counter() - t0)
    if not finite:
        raise WanError(f"{precision}: the {precision} build produced NaN/Inf; nothing was written")
    if psnr < bar:
        raise WanError(f"{precision}: end-to-end PSNR vs fp32 is {psnr:.1f} dB, below the bar of {bar:g} dB; "
                       "nothing was written")
    return record
