"""The seed family's `--text-kv`: what computing the reference K/V once per video saves a `small`
DiT step.

    python -m bench.reference_kv [--plain DIR --kv DIR]

Each block's cross-attention projects the reference tokens to K/V, normalizes K, copies both
per latent frame and rotates each frame's keys by where the motion carries them (export/dit.py,
`WanDiT.reference_kv`): none of it depends on the step. This times one step (CFG batch 2,
`small`'s default video) in PyTorch (`forward` against `step` on K/V made once) and in ONNX
Runtime (the plain build's DiT against a --text-kv build's step, fp32, the graphs wan-run runs),
the context call, and counts both steps' FLOPs. Without --plain/--kv both builds are made first
(fp32, about 3 minutes each on 2 cores).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import numpy as np
import torch

from bench.measure import flops, timed


@click.command()
@click.option("--runs", default=20, show_default=True, help="Timed runs of each step.")
@click.option("--plain", type=click.Path(path_type=Path), help="A plain `small` artifact directory.")
@click.option("--kv", type=click.Path(path_type=Path), help="A `small` artifact directory built with --text-kv.")
def main(runs: int, plain: Path | None, kv: Path | None):
    """Time small's DiT step with the reference K/V computed in the step and once per video."""
    from export.build import build_artifacts
    from export.config import get_preset
    from export.weights import build_models
    from runtime import Pipeline

    cfg = get_preset("small")
    _, dit = build_models(cfg)
    dit.eval()
    g, v = cfg.geometry, cfg.video
    shape = (2, cfg.vae.z_dim, g.frames_to_latent(v.frames), v.height // 8, v.width // 8)
    rng = np.random.default_rng(0)
    latent, ref = rng.standard_normal(shape, np.float32), rng.standard_normal((*shape[:2], 1, *shape[3:]), np.float32)
    timestep = np.array([900.0, 900.0], np.float32)
    motion = np.ascontiguousarray(np.broadcast_to(np.eye(2, 3, dtype=np.float32), (2, shape[2], 2, 3)))
    x, t, r, m = (torch.from_numpy(a) for a in (latent, timestep, ref, motion))
    lines = []
    with torch.no_grad():
        ref_kv = dit.reference_kv(r, m)
        inline, once = timed(lambda: dit(x, t, r, m), runs=runs), timed(lambda: dit.step(x, t, ref_kv), runs=runs)
        context = timed(lambda: dit.reference_kv(r, m), runs=runs)
        f_inline, f_once = flops(dit, x, t, r, m), flops(dit.step, x, t, ref_kv)
    lines.append(f"torch eager: step {inline['median_ms']:.1f} ms ({f_inline / 1e9:.3f} GFLOP) -> "
                 f"{once['median_ms']:.1f} ms ({f_once / 1e9:.3f} GFLOP) with the K/V made once "
                 f"({inline['median_ms'] / once['median_ms']:.2f}x); the context {context['median_ms']:.1f} ms once")
    with tempfile.TemporaryDirectory() as tmp:
        if plain is None:
            plain = Path(tmp) / "plain"
            build_artifacts(cfg, plain)
        if kv is None:
            kv = Path(tmp) / "kv"
            build_artifacts(cfg, kv, text_kv=True)
        p, k = Pipeline.from_dir(plain), Pipeline.from_dir(kv)
        if "dit_context" not in k.stages:
            raise click.UsageError(f"--kv {kv} was not built with --text-kv")
        feeds = {"ref_latent": ref, "motion": motion}
        kv_feed = k.stages["dit_context"](**feeds)
        inline = timed(lambda: p.stages["dit"](latent=latent, timestep=timestep, **feeds), runs=runs)
        once = timed(lambda: k.stages["dit"](latent=latent, timestep=timestep, **kv_feed), runs=runs)
        context = timed(lambda: k.stages["dit_context"](**feeds), runs=runs)
    lines.append(f"ONNX Runtime fp32: step {inline['median_ms']:.1f} ms -> {once['median_ms']:.1f} ms with "
                 f"--text-kv ({inline['median_ms'] / once['median_ms']:.2f}x); the context {context['median_ms']:.1f} "
                 "ms once per video")
    click.echo(f"small DiT step, batch 2, {v.frames}x{v.height}x{v.width}:\n  " + "\n  ".join(lines))


if __name__ == "__main__":
    main()
