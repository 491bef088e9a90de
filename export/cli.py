"""`wan-export`: build an artifact directory from a preset or config (thin layer over build.py)."""

from __future__ import annotations

import dataclasses

import click

from runtime.errors import WanError, run_cli

EXAMPLES = """
\b
Examples:
  wan-export --preset small --out artifacts/small
  wan-export --preset tiny --attention full --out artifacts/tiny-full
  wan-export --config my_model.json --checkpoint my_model.safetensors --out artifacts/mine
  wan-export --preset small --out artifacts/small --force   # rebuild in place

A config JSON holds the fields of a preset (see export/config.py), either in full or as
{"preset": "small", ...overrides}. Weights: seeded initialization unless --checkpoint names
a .safetensors file. Each stage is checked against PyTorch in ONNX Runtime; the measured
errors go into manifest.json, and a stage over its tolerance fails the build.
"""


@click.command(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"],
                                                  "max_content_width": 100})
@click.option("--preset", help="Named model preset: tiny, small (default), wan2.2-5b (analytic only).")
@click.option("--config", "config_path", type=click.Path(path_type=str),
              help="Model config JSON (instead of --preset).")
@click.option("--checkpoint", type=click.Path(path_type=str),
              help="Trained weights (.safetensors only).")
@click.option("--out", "-o", required=True, type=click.Path(path_type=str),
              help="Artifact directory to create.")
@click.option("--attention", type=click.Choice(["factorized", "full"]),
              help="Override the DiT attention of the preset/config.")
@click.option("--opset", type=click.IntRange(17, 23), default=20, show_default=True,
              help="ONNX opset (20: every ONNX Runtime and TensorRT 10.x).")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--debug", is_flag=True, help="Tracebacks and the exporter's own logging.")
def main(preset, config_path, checkpoint, out, attention, opset, force, debug):
    """Export the reference model's three stages to validated ONNX graphs and a manifest."""
    from export.config import get_preset, load_config

    if preset and config_path:
        raise WanError("give --preset or --config, not both")
    cfg = load_config(config_path) if config_path else get_preset(preset or "small")
    if attention:
        cfg = dataclasses.replace(cfg, dit=dataclasses.replace(cfg.dit, attention=attention))
    try:
        from export.build import build_artifacts
    except ImportError as exc:
        raise WanError(f"wan-export needs the build tools ({exc.name} is missing): "
                       "pip install 'wan-export[export]'")
    manifest = build_artifacts(cfg, out, checkpoint=checkpoint, force=force, opset=opset)
    size = sum(f["size"] for f in manifest.files.values()) / 1e6
    click.echo(f"wrote {out}: {cfg.name} ({cfg.dit.attention} attention), "
               f"{len(manifest.stages)} stages, {size:.1f} MB")


entry_point = run_cli(main, "wan-export")
