"""`wan-export` as a library call: reference model -> validated ONNX stages -> artifact directory."""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

import onnx
import torch

from engines.artifacts import ArtifactWriter
from export.config import ModelConfig
from export.onnx_export import DEFAULT_OPSET, export_stage, validate_stage
from export.vae import VAEDecoderStage, VAEEncoderStage
from export.weights import build_models
from runtime.errors import WanError
from runtime.manifest import Artifact, Manifest, Stage
from runtime.stages import STAGE_NAMES, stage_specs

log = logging.getLogger(__name__)


def tool_versions(opset: int) -> dict[str, str]:
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "opset": str(opset),
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def build_artifacts(cfg: ModelConfig, out: str | Path, checkpoint: str | Path | None = None,
                    force: bool = False, opset: int = DEFAULT_OPSET) -> Manifest:
    """Export, validate and write the three fp32 stages of `cfg` to the directory `out`.

    Raises WanError when a stage misses its tolerance; nothing is left at `out` then.
    """
    cfg.validate()
    with ArtifactWriter(out, force) as writer:  # checks `out` before any slow work
        vae, dit = build_models(cfg, checkpoint)
        modules = {"vae_encoder": VAEEncoderStage(vae), "dit": dit, "vae_decoder": VAEDecoderStage(vae)}
        specs, symbols = stage_specs(cfg.geometry), cfg.symbol_ranges()
        stages = {}
        for i, name in enumerate(STAGE_NAMES, 1):
            rel = f"onnx/fp32/{name}.onnx"
            t0 = time.perf_counter()
            log.info("[%d/%d] %s: exporting", i, len(STAGE_NAMES), name)
            export_stage(modules[name], specs[name], symbols, writer.path(rel), opset)
            check = validate_stage(modules[name], specs[name], writer.path(rel))
            log.info("[%d/%d] %s: max abs err %.2e, rel %.2e (tolerance %.0e) in %.1f s",
                     i, len(STAGE_NAMES), name, check["max_abs"], check["max_rel"],
                     check["tolerance"], time.perf_counter() - t0)
            if not check["passed"]:
                raise WanError(f"stage {name}: ONNX Runtime differs from PyTorch by "
                               f"{check['max_rel']:.2e} (relative), above the tolerance "
                               f"{check['tolerance']:.0e}; nothing was written")
            stages[name] = Stage(specs[name], {"fp32": Artifact("fp32", rel, check)})
        manifest = Manifest(
            model=cfg.to_dict(),
            geometry=cfg.geometry,
            latent_mean=tuple(vae.latent_mean.tolist()),
            latent_std=tuple(vae.latent_std.tolist()),
            sampler=cfg.to_dict()["sampler"],
            video=cfg.to_dict()["video"],
            symbols=symbols,
            stages=stages,
            files={},  # filled in by the writer, which hashes what it wrote
            tools=tool_versions(opset),
        )
        return writer.commit(manifest)
