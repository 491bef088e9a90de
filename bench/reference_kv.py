"""The seed family's version of --text-kv, measured before building it: how much of a `small` DiT
step is the reference side of its cross-attention, which is the same at every step.

    python -m bench.reference_kv

Each block's cross-attention projects the reference tokens to K/V, normalizes K, copies both
per latent frame and rotates each frame's keys by where the motion carries them (export/dit.py,
`Attention.cross`): none of it depends on the step. This times the PyTorch step (CFG batch 2,
`small`'s default video) as it is and with that work done once, at the first call, and counts
both steps' FLOPs.
"""

from __future__ import annotations

import click
import torch

from bench.measure import flops, timed


@click.command()
@click.option("--runs", default=20, show_default=True, help="Timed runs of each step.")
def main(runs: int):
    """Time small's DiT step with and without the reference K/V recomputed every step."""
    import export.dit as dit_module
    from export.config import get_preset
    from export.weights import build_models

    cfg = get_preset("small")
    _, dit = build_models(cfg)
    dit.eval()
    g, v = cfg.geometry, cfg.video
    shape = (2, cfg.vae.z_dim, g.frames_to_latent(v.frames), v.height // 8, v.width // 8)
    args = (torch.randn(shape), torch.rand(2) * 1000, torch.randn(*shape[:2], 1, *shape[3:]),
            torch.eye(2, 3).expand(2, shape[2], 2, 3).contiguous())  # latent, timestep, reference, motion
    with torch.no_grad():
        plain, plain_flops = timed(lambda: dit(*args), runs=runs), flops(dit, *args)

    held = {}

    def cross(self, x, context, rope_q, rope_k, grid):
        """Attention.cross with the reference K/V kept from the first call."""
        B, _, D = x.shape
        T = grid[0]
        if id(self) not in held:
            k, v = dit_module.project(context, self.to_k, self.to_v)
            Lr = k.shape[1]
            k = self.norm_k(k)[:, None].expand(B, T, Lr, D).reshape(B * T, Lr, D)  # a copy per frame
            v = v[:, None].expand(B, T, Lr, D).reshape(B * T, Lr, D)
            held[id(self)] = (self.kernels.rotary_each(k, *rope_k, self.heads), v)
        k, v = held[id(self)]
        q = self.kernels.rotary(self.norm_q(self.to_q(x)), *rope_q, self.heads)  # (B, L, D)
        out = self.kernels.attention(dit_module.group(q, "spatial", grid), k, v, self.heads)
        return self.to_out[0](dit_module.ungroup(out, "spatial", grid))

    original = dit_module.Attention.cross
    dit_module.Attention.cross = cross
    try:
        with torch.no_grad():
            dit(*args)  # fills `held`
            kept, kept_flops = timed(lambda: dit(*args), runs=runs), flops(dit, *args)
    finally:
        dit_module.Attention.cross = original
    click.echo(f"small DiT step (torch eager, batch 2): {plain['median_ms']:.1f} ms, {plain_flops / 1e9:.3f} GFLOP; "
               f"reference K/V kept: {kept['median_ms']:.1f} ms, {kept_flops / 1e9:.3f} GFLOP "
               f"({plain['median_ms'] / kept['median_ms']:.2f}x)")


if __name__ == "__main__":
    main()
