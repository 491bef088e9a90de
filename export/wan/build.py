"""`wan-export --model DIR`: a released Wan checkpoint -> validated ONNX stages -> artifact directory.

The same machinery as the seed family's build (export/build.py): every graph goes through
`export_checked` (exported from its StageSpec, checked against PyTorch at two shapes), the
artifact writer, TensorRT engines. What differs lives here: the modules are diffusers' and
transformers' own, loaded one component at a time and freed after its stages are written, so
the export holds about one copy of the weights beside the exporter's own; the tokenizer file
and the scheduler config travel in the artifact directory for the runtime.
"""

from __future__ import annotations

import gc
import logging
import shutil
import time
from pathlib import Path

from engines.artifacts import ArtifactWriter
from engines.tensorrt import EngineOptions, resolve_flavour, symbol_profile
from export.build import build_engines, engine_tools, export_checked, tool_versions
from export.onnx_export import DEFAULT_OPSET
from export.wan import known
from export.wan.checkpoint import (MAX_SEQUENCE_LENGTH, WanCheckpoint, load_text_encoder, load_transformer,
                                   load_vae, read_checkpoint)
from export.wan.stages import (DecoderFirstStage, DecoderStepStage, DiTStage, ImageEncoderStage,
                               TextEncoderStage, decoder_cache_layout, wan_geometry, wan_stage_specs)
from runtime.errors import WanError
from runtime.manifest import PRECISIONS, Artifact, Manifest, Stage
from runtime.stages import SymbolRange

log = logging.getLogger(__name__)

TOKENIZER = "text/tokenizer.json"
MAX_VIDEO_PX = 1280  # the exported range: every release's sizes (720p is 1280x720 / 1280x704)
MAX_VIDEO_FRAMES = 129  # TI2V-5B's 121 frames and more


def defaults(ckpt: WanCheckpoint) -> tuple[dict, dict, str | None]:
    """Sampler and video defaults: the release's recommendations when the folder is one (or a
    fine-tune of one), else diffusers' pipeline defaults; the shift is the scheduler's own."""
    k = known.match(ckpt.transformer)
    shift = ckpt.scheduler.get("flow_shift", ckpt.scheduler.get("shift", 1.0))
    if k is None:
        sampler = {"steps": 50, "guidance": 5.0, "fps": 16}
        video = {"frames": 81, "height": 480, "width": 832}
    else:
        sampler = {"steps": k.steps, "guidance": k.guidance, "fps": k.fps}
        video = {"frames": k.frames, "height": k.height, "width": k.width}
    sampler.update(shift=float(shift), solver=ckpt.scheduler["_class_name"])
    return sampler, video, (k.name if k else None)


def symbol_ranges(ckpt: WanCheckpoint, video: dict) -> dict[str, SymbolRange]:
    geom = wan_geometry(ckpt.vae)
    ph, pw = geom.pixels_per_token
    return {"B": SymbolRange(1, 2, 8),
            "F": SymbolRange(1, geom.frames_to_latent(video["frames"]), geom.frames_to_latent(MAX_VIDEO_FRAMES)),
            "Hp": SymbolRange(1, video["height"] // ph, MAX_VIDEO_PX // ph),
            "Wp": SymbolRange(1, video["width"] // pw, MAX_VIDEO_PX // pw)}


def build_wan_artifacts(model_dir: str | Path, out: str | Path, force: bool = False,
                        opset: int = DEFAULT_OPSET, precisions: tuple[str, ...] = ("fp32",),
                        engines: EngineOptions | None = None) -> Manifest:
    """Export a diffusers-layout Wan folder's stages to the artifact directory `out`."""
    ckpt = read_checkpoint(model_dir)  # everything checked before anything is loaded
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise WanError(f"precision {unknown[0]!r} is not one of {', '.join(PRECISIONS)}")
    reduced = [p for p in precisions if p != "fp32"]
    if reduced:
        raise WanError(f"--precision {','.join(reduced)} is not built for released Wan models yet: "
                       "export fp32 (the default)")
    sampler, video, release = defaults(ckpt)
    symbols = symbol_ranges(ckpt, video)
    geom = wan_geometry(ckpt.vae)
    stage_names = ["text_encoder", *(["vae_encoder"] if ckpt.takes_image else []), "dit",
                   "vae_decoder_first", "vae_decoder_step"]
    if engines is not None:
        resolve_flavour(engines.flavour)
        for name in stage_names:
            symbol_profile(engines, geom, name, symbols)
    log.info("%s: %s (%s%s)", ckpt.root, ckpt.pipeline, ckpt.version, f", {release}" if release else "")
    with ArtifactWriter(out, force) as writer:
        stages, latent = export_stages(ckpt, writer, symbols, opset, stage_names)
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
                "takes_image": ckpt.takes_image, "negative_prompt": "",
            },
        )
        if engines is not None:
            build_engines(manifest, writer.staging, engines, ("fp32",))
            manifest.tools.update(engine_tools(manifest))
        return writer.commit(manifest)


def export_stages(ckpt: WanCheckpoint, writer: ArtifactWriter, symbols, opset: int, stage_names: list[str]):
    """Each component loaded in turn, its stages exported and checked, then freed. Returns the
    stages and the latent normalization (mean, std)."""
    count = iter(range(1, len(stage_names) + 1))
    stages: dict[str, Stage] = {}

    def export(name: str, module, specs) -> None:
        rel = f"onnx/fp32/{name}.onnx"
        label = f"[{next(count)}/{len(stage_names)}] {name}"
        check = export_checked(label, module.eval(), specs[name], symbols, writer.path(rel), opset)
        stages[name] = Stage(specs[name], {"fp32": Artifact("fp32", rel, check)})

    t0 = time.perf_counter()
    vae = load_vae(ckpt)
    layout = decoder_cache_layout(vae)
    latent = (tuple(float(x) for x in vae.config.latents_mean), tuple(float(x) for x in vae.config.latents_std))
    specs = wan_stage_specs(wan_geometry(ckpt.vae), ckpt.transformer.get("text_dim", 4096),
                            MAX_SEQUENCE_LENGTH, ckpt.expand_timesteps, ckpt.takes_image, layout)
    if ckpt.takes_image:
        export("vae_encoder", ImageEncoderStage(vae), specs)
    export("vae_decoder_first", DecoderFirstStage(vae, layout), specs)
    export("vae_decoder_step", DecoderStepStage(vae, layout), specs)
    del vae
    gc.collect()
    encoder = load_text_encoder(ckpt)
    export("text_encoder", TextEncoderStage(encoder), specs)
    del encoder
    gc.collect()
    transformer = load_transformer(ckpt)
    export("dit", DiTStage(transformer, ckpt.expand_timesteps), specs)
    del transformer
    gc.collect()
    log.info("exported %d stages in %.1f s", len(stages), time.perf_counter() - t0)
    return {name: stages[name] for name in stage_names}, latent
