"""`wan-export`: build an artifact directory from a preset or config (thin layer over build.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from runtime.errors import WanError, run_cli
from runtime.manifest import MANIFEST_NAME, sha256_file

EXAMPLES = """
\b
Examples:
  wan-export --model Wan2.1-T2V-1.3B-Diffusers --out artifacts/wan21-1.3b   # a released checkpoint
  wan-export --model Wan2.1-I2V-14B-480P-Diffusers --out artifacts/i2v --reuse artifacts/wan21-14b
  wan-export --list-models
  wan-export --preset small --out artifacts/small
  wan-export --preset tiny --attention full --out artifacts/tiny-full
  wan-export --config my_model.json --checkpoint my_model.safetensors --out artifacts/mine
  wan-export --preset small --out artifacts/small --force   # rebuild in place

--model takes a Wan pipeline folder in the Hugging Face diffusers layout (model_index.json with
transformer/, vae/, text_encoder/, tokenizer/, scheduler/; safetensors weights; Wan2.2 A14B
adds transformer_2/, Wan2.1 I2V image_encoder/ and image_processor/). --reuse copies the stages
another export made from the same weights (releases share the VAE and the text encoder) instead
of exporting them again. A config JSON
holds the fields of a preset (see export/config.py), either in full or as
{"preset": "small", ...overrides}. Weights: --checkpoint (a .safetensors file), else the
preset's bundled trained weights (small), else seeded initialization (tiny). Each stage is checked against PyTorch in ONNX Runtime; the measured
errors go into manifest.json, and a stage over its tolerance fails the build.
"""


@click.command(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"],
                                                  "max_content_width": 100})
@click.option("--model", "model_dir", type=click.Path(path_type=str),
              help="A released Wan checkpoint: a diffusers-layout pipeline folder (see --list-models).")
@click.option("--list-models", is_flag=True, help="Name the released checkpoints --model accepts, with "
              "their sampling defaults, and exit.")
@click.option("--preset", help="Named model preset: tiny, small (default), wan2.2-5b (analytic only).")
@click.option("--config", "config_path", type=click.Path(path_type=str),
              help="Model config JSON (instead of --preset).")
@click.option("--checkpoint", type=click.Path(path_type=str),
              help="Trained weights (.safetensors only).")
@click.option("--out", "-o", type=click.Path(path_type=str),
              help="Artifact directory to create.")
@click.option("--attention", type=click.Choice(["factorized", "full"]),
              help="Override the DiT attention of the preset/config.")
@click.option("--opset", type=click.IntRange(17, 23), default=20, show_default=True,
              help="ONNX opset (20: every ONNX Runtime and TensorRT 10.x).")
@click.option("--precision", "precision_list", default="fp32", show_default=True,
              help="Comma-separated precisions to build: fp32, fp16, int8 (fp32 is always built).")
@click.option("--int8-float-layers", multiple=True, metavar="PATTERN",
              help="Module-path glob kept float in int8 graphs (repeatable; replaces the defaults: "
                   "DiT embedders/patch embedding/head, first and last VAE convs). 'none': quantize all.")
@click.option("--tensorrt", is_flag=True, help="Also build a TensorRT .plan per stage and precision.")
@click.option("--trt-flavour", type=click.Choice(["auto", "tensorrt", "tensorrt-rtx"]), default="auto",
              show_default=True, help="Full TensorRT or TensorRT for RTX (builds without a GPU).")
@click.option("--min", "min_shape", metavar="FxHxW", help="Smallest video an engine accepts "
              "(default: 1 frame at half the preset size).")
@click.option("--opt", "opt_shape", metavar="FxHxW", help="Video size engines are tuned for "
              "(default: the preset's).")
@click.option("--max", "max_shape", metavar="FxHxW", help="Largest video an engine accepts "
              "(default: twice the preset's frames-1 and size, within the exported range).")
@click.option("--builder-optimization-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="TensorRT builder optimization level (higher: slower build, maybe faster engine).")
@click.option("--compute-capability", multiple=True, metavar="SMxx",
              help="TensorRT-RTX target GPU architectures (repeatable), e.g. SM86 SM89.")
@click.option("--timing-cache", type=click.Path(path_type=str),
              help="TensorRT timing cache to load and update (default: one inside the artifacts).")
@click.option("--reuse", type=click.Path(path_type=str), help="--model: an artifact directory whose stages "
              "made from the same weights, code and tools are copied, not exported again.")
@click.option("--text-kv", is_flag=True, help="Compute the cross-attention keys and values of the context tokens "
              "once per video, in a context graph (dit_context) whose outputs the step graph takes, instead of at "
              "every step: --model's text (and image) tokens, per expert (held per video: 2 x layers x 512 x dim "
              "floats per prompt); the project's model's reference tokens, rotated per latent frame (2 x layers "
              "x frames x tokens per frame x dim floats per branch).")
@click.option("--fused-attention", is_flag=True, help="--model: also write each expert's step as an ONNX Runtime "
              "graph with fused attention (com.microsoft.MultiHeadAttention), which wan-run then runs on ONNX "
              "Runtime; TensorRT and fp16 keep the portable graph. The experts' weights are stored twice.")
@click.option("--force", is_flag=True, help="Replace an existing artifact directory (only one written by "
              "wan-export and holding nothing else; only after the new build has succeeded).")
@click.option("--debug", is_flag=True, help="Tracebacks and the exporter's own logging.")
def main(model_dir, list_models, preset, config_path, checkpoint, out, attention, opset, precision_list,
         int8_float_layers, tensorrt, trt_flavour, min_shape, opt_shape, max_shape,
         builder_optimization_level, compute_capability, timing_cache, reuse, text_kv, fused_attention, force,
         debug):
    """Export a model's stages to validated ONNX graphs (and TensorRT engines) with a manifest:
    a released Wan checkpoint (--model) or this project's own model (--preset / --config)."""
    from export.config import get_preset, load_config

    if list_models:
        from export.wan.known import table

        click.echo(table())
        return
    if out is None:
        raise WanError("give --out DIR, the artifact directory to write")
    if preset and config_path:
        raise WanError("give --preset or --config, not both")
    if model_dir is not None:
        given = [f"--{n}" for n, v in (("preset", preset), ("config", config_path), ("checkpoint", checkpoint),
                                        ("attention", attention)) if v]
        if given or int8_float_layers:
            raise WanError(f"--model is a released checkpoint: {', '.join(given) or '--int8-float-layers'} "
                           "belongs to the project's own model, not to it")
        export_released(model_dir, out, force, opset, precision_list, tensorrt, trt_flavour, min_shape,
                        opt_shape, max_shape, builder_optimization_level, compute_capability, timing_cache, reuse,
                        text_kv, fused_attention)
        return
    wan_only = [flag for flag, given in (("--reuse", reuse), ("--fused-attention", fused_attention)) if given]
    if wan_only:
        raise WanError(f"{wan_only[0]} is for released models: it goes with --model")
    cfg = load_config(config_path) if config_path else get_preset(preset or "small")
    if attention:
        cfg = dataclasses.replace(cfg, dit=dataclasses.replace(cfg.dit, attention=attention))
    build_artifacts = build_tool("export.build", "wan-export").build_artifacts
    precisions = parse_precisions(precision_list)
    layers = None
    if int8_float_layers:
        layers = () if list(int8_float_layers) == ["none"] else tuple(int8_float_layers)
    v = cfg.video
    maxima = {"frames": v.max_frames, "height": v.max_height, "width": v.max_width}
    engines = engine_options(dataclasses.asdict(v), maxima, cfg.geometry.pixels_per_token[0], min_shape,
                             opt_shape, max_shape, trt_flavour, builder_optimization_level, compute_capability,
                             timing_cache) if tensorrt else None
    manifest = build_artifacts(cfg, out, checkpoint=checkpoint, force=force, opset=opset,
                               precisions=precisions, int8_float_layers=layers, engines=engines, text_kv=text_kv)
    size = sum(f["size"] for f in manifest.files.values()) / 1e6
    click.echo(f"wrote {out}: {cfg.name} ({cfg.dit.attention} attention, {manifest.weights['source']} "
               f"weights), {len(manifest.stages)} stages at {', '.join(manifest.precisions())}, {size:.1f} MB")
    report(manifest, out, engines)


def build_tool(module: str, what: str):
    """The build module `module`, or one line saying which install it needs."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise WanError(f"{what} needs the build tools ({exc.name} is missing): pip install 'wan-export[export]'")


def parse_precisions(text: str) -> tuple[str, ...]:
    """'fp32,fp16, int8' -> ('fp32', 'fp16', 'int8'); the builds check the names."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


def report(manifest, out, engines) -> None:
    """The quality of each reduced precision, the engines, and the manifest's sha256."""
    for p, q in manifest.quality.items():
        stages = ", ".join(f"{n} {e:.1e}" for n, e in q["stage_max_rel"].items())
        click.echo(f"  {p}: {q['psnr_db']:.1f} dB vs fp32 (bar {q['bar_db']:g}), VAE {q['vae']}; "
                   f"stage rel err: {stages}")
        if "psnr_db_expert_alone" in q:
            alone = ", ".join(f"{n} {db:.1f} dB" for n, db in q["psnr_db_expert_alone"].items())
            click.echo(f"    each expert reduced alone (the other fp32): {alone}")
        if "note" in q:
            click.echo(f"    ({q['note']})")
    if engines is not None:
        click.echo(f"  TensorRT ({manifest.tools['tensorrt_flavour']} {manifest.tools['tensorrt']}) "
                   f"engines: profile {engines.min_shape} / {engines.opt_shape} / {engines.max_shape}")
    # For deployments that pin the artifacts: wan-run --expect-manifest SHA256.
    click.echo(f"  manifest sha256 {sha256_file(Path(out) / MANIFEST_NAME)}")


def export_released(model_dir, out, force, opset, precision_list, tensorrt, flavour, min_shape, opt_shape,
                    max_shape, level, targets, timing_cache, reuse=None, text_kv=False,
                    fused_attention=False) -> None:
    """--model: a diffusers-layout Wan folder through export/wan/build.py."""
    wan = build_tool("export.wan.build", "wan-export --model (diffusers, transformers)")
    precisions = parse_precisions(precision_list)
    engines = None
    if tensorrt:
        ckpt = wan.read_checkpoint(model_dir)
        _, video, _ = wan.defaults(ckpt)
        maxima = {"frames": wan.MAX_VIDEO_FRAMES, "height": wan.MAX_VIDEO_PX, "width": wan.MAX_VIDEO_PX}
        engines = engine_options(video, maxima, wan.wan_geometry(ckpt.vae).pixels_per_token[0], min_shape,
                                 opt_shape, max_shape, flavour, level, targets, timing_cache)
    manifest = wan.build_wan_artifacts(model_dir, out, force=force, opset=opset, precisions=precisions,
                                       engines=engines, reuse=reuse, text_kv=text_kv,
                                       fused_attention=fused_attention)
    size = sum(f["size"] for f in manifest.files.values()) / 1e6
    release = manifest.model["release"]
    click.echo(f"wrote {out}: {manifest.model['pipeline']} ({manifest.model['version']}"
               f"{', like ' + release if release else ''}), {len(manifest.stages)} stages at "
               f"{', '.join(manifest.precisions())}, {size:.1f} MB")
    report(manifest, out, engines)


def engine_options(video: dict, maxima: dict, multiple: int, min_shape, opt_shape, max_shape, flavour, level,
                   targets, timing_cache):
    """Engine profile shapes from the flags, defaulting around the default video (frames, height,
    width) and within the exported `maxima`; sizes stay multiples of the model's pixels per token."""
    from engines.tensorrt import EngineOptions, VideoShape

    half = lambda n: max(multiple, n // 2 // multiple * multiple)  # noqa: E731
    default_min = VideoShape(1, half(video["height"]), half(video["width"]))
    default_opt = VideoShape(video["frames"], video["height"], video["width"])
    default_max = VideoShape(min(2 * video["frames"] - 1, maxima["frames"]), min(2 * video["height"], maxima["height"]),
                             min(2 * video["width"], maxima["width"]))
    return EngineOptions(
        min_shape=VideoShape.parse(min_shape, "--min") if min_shape else default_min,
        opt_shape=VideoShape.parse(opt_shape, "--opt") if opt_shape else default_opt,
        max_shape=VideoShape.parse(max_shape, "--max") if max_shape else default_max,
        flavour=flavour, builder_optimization_level=level,
        compute_capabilities=tuple(targets), timing_cache=Path(timing_cache) if timing_cache else None)


entry_point = run_cli(main, "wan-export")
