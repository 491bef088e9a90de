"""The diffusion transformer: one denoising step, latent + timestep + reference -> velocity.

Follows the seed note with Wan/diffusers parameter names (so released checkpoints can be mapped
by a rename table). A block reads like the paper:

    x = x + gate_msa * spatial_attn(modulate(norm1(x)))    (B*T, H*W, D): one frame at a time
    x = x + cross_attn(norm2(x), reference tokens)        Q = video, K/V = reference image
    x = x + gate_t * temporal_attn(modulate(norm_t(x)))    (B*H*W, T, D): bidirectional
    x = x + c_gate * ffn(modulate(norm3(x)))

With `attention="full"` attn1 is joint 3D attention over all T*H*W tokens (as released Wan
checkpoints) and there is no temporal sub-block. Modulation follows Wan: one shared projection
of the timestep embedding (6 rows per block, 9 when factorized) plus a learned per-block table.

Reference conditioning: the normalized reference latent (the VAE encoding of the image as a
1-frame video) is patchified and passed through an MLP into context tokens. Cross-attention
rotates the video queries by their (t, h, w) and the reference keys by (0, h', w'), where
(h', w') is where the `motion` input carries reference token (h, w) by the query's latent frame
(runtime/motion.py), so a query finds the reference patch that belongs at its own position: each
frame's queries attend to the keys placed for that frame. The identity motion leaves every key
at its own (h, w). The CFG null condition is the embedding of an all-zero reference latent
(zero = the latent mean) with the identity motion; training drops the reference the same way.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from export.config import DiTConfig
from export.kernels import TORCH, Kernels
from export.rope import rope_at, rope_tables


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def timestep_features(t, dim: int):
    """Sinusoidal features of timesteps (B,) -> (B, dim), cos first as in Wan."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class RMSNorm(nn.Module):
    """RMS norm over the last dim (Wan's q/k norms; parameter `weight` like torch's RMSNorm).

    Written out as x / sqrt(mean(x^2) + eps) * weight: ONNX Runtime fuses exactly this
    pattern into one SimplifiedLayerNormalization node (torch's own RMSNorm exports as a
    reciprocal square root that it leaves as seven nodes)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def project(x, *linears: nn.Linear):
    """Several projections of one input as one wider matmul (q, k, v): one GEMM call instead
    of three, and for int8 one quantized activation feeding one integer matmul."""
    weight = torch.cat([lin.weight for lin in linears])  # (n*D_out, D_in)
    bias = torch.cat([lin.bias for lin in linears])
    return F.linear(x, weight, bias).chunk(len(linears), dim=-1)


class Attention(nn.Module):
    """Multi-head attention with q/k RMSNorm over the full inner dim (Wan's norm_q / norm_k).

    Tokens stay in (batch, sequence, heads * head_dim) layout throughout; the attention core
    and the rotary embedding come from `kernels` (export/kernels.py), so the same module
    exports either portable ONNX or ONNX Runtime's fused contrib ops."""

    def __init__(self, cfg: DiTConfig, kernels: Kernels = TORCH):
        super().__init__()
        D = cfg.dim
        self.heads, self.kernels = cfg.num_heads, kernels
        self.to_q, self.to_k, self.to_v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.to_out = nn.ModuleList([nn.Linear(D, D), nn.Dropout(0.0)])
        self.norm_q = RMSNorm(D, eps=cfg.eps)
        self.norm_k = RMSNorm(D, eps=cfg.eps)

    def forward(self, x, context, rope_q, rope_k, layout: str, grid):
        """x (B, L, D), context (B, Lc, D) -> (B, L, D).

        layout: "full" (every query sees every key), "spatial" or "temporal" (self-attention
        regrouped over the (T, H, W) token grid, see `group`); `context is x` for self-attention.
        """
        if context is x:
            q, k, v = project(x, self.to_q, self.to_k, self.to_v)
        else:
            q, (k, v) = self.to_q(x), project(context, self.to_k, self.to_v)
        rotary = self.kernels.rotary
        q = rotary(self.norm_q(q), *rope_q, self.heads)  # (B, L, D)
        k = rotary(self.norm_k(k), *rope_k, self.heads)
        out = self.kernels.attention(*(group(t, layout, grid) for t in (q, k, v)), self.heads)
        return self.to_out[0](ungroup(out, layout, grid))

    def reference_kv(self, context, rope_k, frames: int):
        """The step-independent half of the cross-attention: context (B, Lr, D) reference
        tokens, rope_k (B*T, Lr, d/2) tables placing the keys for each of `frames` latent
        frames (`reference_rope`) -> k, v (B*T, Lr, D): the keys normalized and rotated per
        frame, the values copied per frame."""
        B, Lr, D = context.shape
        k, v = project(context, self.to_k, self.to_v)
        k = self.norm_k(k)[:, None].expand(B, frames, Lr, D).reshape(B * frames, Lr, D)  # a copy per frame
        v = v[:, None].expand(B, frames, Lr, D).reshape(B * frames, Lr, D)
        return self.kernels.rotary_each(k, *rope_k, self.heads), v  # a table per (batch item, frame)

    def cross(self, x, k, v, rope_q, grid):
        """Cross-attention, frame by frame: x (B, T*H*W, D) video tokens, k, v (B*T, Lr, D)
        from `reference_kv` -> (B, T*H*W, D)."""
        q = self.kernels.rotary(self.norm_q(self.to_q(x)), *rope_q, self.heads)  # (B, L, D)
        out = self.kernels.attention(group(q, "spatial", grid), k, v, self.heads)  # (B*T, H*W, D)
        return self.to_out[0](ungroup(out, "spatial", grid))


def group(x, layout: str, grid):
    """(B, T*H*W, D) -> (B', L', D): the seed's view-based factorization (tokens are t-major)."""
    B, L, D = x.shape
    T, H, W = grid
    if layout == "full":
        return x
    if layout == "spatial":
        return x.reshape(B * T, H * W, D)  # (B*T, H*W, D): one frame per sequence
    x = x.reshape(B, T, H * W, D).transpose(1, 2)  # (B, H*W, T, D)
    return x.reshape(B * H * W, T, D)  # one spatial position per sequence


def ungroup(x, layout: str, grid):
    """Inverse of `group`: (B', L', D) -> (B, T*H*W, D)."""
    T, H, W = grid
    D = x.shape[-1]
    if layout == "full":
        return x
    if layout == "spatial":
        return x.reshape(-1, T * H * W, D)
    x = x.reshape(-1, H * W, T, D).transpose(1, 2)  # (B, T, H*W, D)
    return x.reshape(-1, T * H * W, D)


class FeedForward(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(cfg.dim, cfg.ffn_dim), nn.Dropout(0.0),
                                  nn.Linear(cfg.ffn_dim, cfg.dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class GELUProj(nn.Module):
    """diffusers' GELU(approximate="tanh") layer: `proj` then the activation."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class WanBlock(nn.Module):
    def __init__(self, cfg: DiTConfig, kernels: Kernels = TORCH):
        super().__init__()
        D, eps = cfg.dim, cfg.eps
        self.factorized = cfg.attention == "factorized"
        self.norm1 = nn.LayerNorm(D, eps, elementwise_affine=False)
        self.attn1 = Attention(cfg, kernels)
        self.norm2 = nn.LayerNorm(D, eps, elementwise_affine=True)
        self.attn2 = Attention(cfg, kernels)
        self.norm3 = nn.LayerNorm(D, eps, elementwise_affine=False)
        self.ffn = FeedForward(cfg)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, D) / D**0.5)
        if self.factorized:
            self.norm_temporal = nn.LayerNorm(D, eps, elementwise_affine=False)
            self.attn_temporal = Attention(cfg, kernels)
            self.scale_shift_table_temporal = nn.Parameter(torch.randn(1, 3, D) / D**0.5)

    def forward(self, x, mod, ref_k, ref_v, rope_video, grid):
        """x (B, L, D); mod (B, 6 or 9, D) from the timestep; ref_k, ref_v (B*T, Lr, D) this
        block's reference keys and values in each frame (`Attention.reference_kv`)."""
        shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = (
            self.scale_shift_table + mod[:, :6]).chunk(6, dim=1)
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        layout = "spatial" if self.factorized else "full"
        x = x + gate_msa * self.attn1(h, h, rope_video, rope_video, layout, grid)
        x = x + self.attn2.cross(self.norm2(x), ref_k, ref_v, rope_video, grid)
        if self.factorized:
            t_shift, t_scale, t_gate = (self.scale_shift_table_temporal + mod[:, 6:9]).chunk(3, dim=1)
            h = modulate(self.norm_temporal(x), t_shift, t_scale)
            x = x + t_gate * self.attn_temporal(h, h, rope_video, rope_video, "temporal", grid)
        return x + c_gate * self.ffn(modulate(self.norm3(x), c_shift, c_scale))


class TimestepEmbedder(nn.Module):
    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(freq_dim, dim), nn.Linear(dim, dim)

    def forward(self, features):
        return self.linear_2(F.silu(self.linear_1(features)))


class ReferenceEmbedder(nn.Module):
    """Reference latent (B, C, 1, h, w) -> context tokens (B, h/2 * w/2, D): patchify + MLP."""

    def __init__(self, cfg: DiTConfig, in_channels: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.linear_1, self.linear_2 = nn.Linear(cfg.dim, cfg.dim), nn.Linear(cfg.dim, cfg.dim)

    def forward(self, ref_latent):
        x = self.proj(ref_latent).flatten(2).transpose(1, 2)  # (B, Hr*Wr, D)
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class ConditionEmbedder(nn.Module):
    def __init__(self, cfg: DiTConfig, in_channels: int):
        super().__init__()
        self.n_mod = 9 if cfg.attention == "factorized" else 6
        self.time_embedder = TimestepEmbedder(cfg.freq_dim, cfg.dim)
        self.time_proj = nn.Linear(cfg.dim, self.n_mod * cfg.dim)
        self.ref_embedder = ReferenceEmbedder(cfg, in_channels)


def reference_rope(motion, grid, head_dim: int, theta: float):
    """motion (B, T, 2, 3) affine maps of the token grid, (x, y, 1) -> (x', y'), one per latent
    frame -> cos, sin (B*T, H*W, d/2): RoPE tables of the reference keys where each frame's map
    carries them (token (i, j) sits at x = j, y = i)."""
    B, T = motion.shape[:2]
    _, H, W = grid
    ys = torch.arange(H, dtype=torch.float32)[:, None].expand(H, W).reshape(1, H * W)
    xs = torch.arange(W, dtype=torch.float32)[None, :].expand(H, W).reshape(1, H * W)
    m = motion.reshape(B * T, 6)  # rows (a, b, c), (d, e, f): x' = a x + b y + c, y' = d x + e y + f
    # Elementwise, not a MatMul: the fp16 and int8 builds convert MatMuls, and positions must
    # stay fp32 (a RoPE angle is position x frequency).
    x_moved = m[:, 0:1] * xs + m[:, 1:2] * ys + m[:, 2:3]  # (B*T, H*W)
    y_moved = m[:, 3:4] * xs + m[:, 4:5] * ys + m[:, 5:6]
    return rope_at(y_moved, x_moved, head_dim, theta)


class WanDiT(nn.Module):
    """`kernels`: how attention and RoPE are computed (export/kernels.py); the parameters and
    the result are the same either way."""

    def __init__(self, cfg: DiTConfig, in_channels: int, kernels: Kernels = TORCH):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.patch_embedding = nn.Conv3d(in_channels, D, cfg.patch_size, stride=cfg.patch_size)
        self.condition_embedder = ConditionEmbedder(cfg, in_channels)
        self.blocks = nn.ModuleList([WanBlock(cfg, kernels) for _ in range(cfg.num_layers)])
        self.norm_out = nn.LayerNorm(D, cfg.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(D, in_channels * math.prod(cfg.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, D) / D**0.5)

    def forward(self, latent, timestep, ref_latent, motion):
        """latent (B, C, F, h, w), timestep (B,) in [0, 1000], ref_latent (B, C, 1, h, w),
        motion (B, F, 2, 3) (runtime/motion.py) -> velocity (B, C, F, h, w), the
        flow-matching target noise - x0."""
        # each block's K/V go straight to it: no stack (a copy of all of them) in the plain graph
        return self._step(latent, timestep, self._block_kv(ref_latent, motion))

    def reference_kv(self, ref_latent, motion):
        """What the reference contributes to a step, which no step changes: ref_latent
        (B, C, 1, h, w), motion (B, F, 2, 3) -> ref_kv (B, 2 * layers, F, H, W, D), every
        block's cross-attention keys (rotated to where each frame's map puts them) and values
        (copied per frame), k then v for each block. `--text-kv` builds run this once per video
        (the `dit_context` stage) and `step` at every step."""
        B, _, _, h, w = ref_latent.shape
        grid = (motion.shape[1], h // self.cfg.patch_size[1], w // self.cfg.patch_size[2])
        kv = [t.reshape(B, *grid, self.cfg.dim)  # (B*F, H*W, D) -> (B, F, H, W, D)
              for pair in self._block_kv(ref_latent, motion) for t in pair]
        return torch.stack(kv, dim=1)  # (B, 2L, F, H, W, D)

    def step(self, latent, timestep, ref_kv):
        """One denoising step from the reference's keys and values (`reference_kv`):
        latent (B, C, F, h, w), timestep (B,), ref_kv (B, 2 * layers, F, H, W, D) -> velocity."""
        B, _, Fr, H, W, D = ref_kv.shape
        kv = ref_kv.reshape(B, 2 * self.cfg.num_layers, Fr * H * W, D)  # (B, 2L, F*Lr, D)
        pairs = [tuple(kv[:, 2 * i + j].reshape(B * Fr, H * W, D) for j in (0, 1))  # (B*F, Lr, D)
                 for i in range(self.cfg.num_layers)]
        return self._step(latent, timestep, pairs)

    def _block_kv(self, ref_latent, motion) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(k, v) of each block's cross-attention, each (B*F, H*W, D)."""
        cfg, Fr = self.cfg, motion.shape[1]
        context = self.condition_embedder.ref_embedder(ref_latent)  # (B, H*W, D)
        _, _, _, h, w = ref_latent.shape
        grid = (Fr, h // cfg.patch_size[1], w // cfg.patch_size[2])
        rope_ref = reference_rope(motion, grid, cfg.head_dim, cfg.rope_theta)  # (B*F, H*W, d/2)
        return [block.attn2.reference_kv(context, rope_ref, Fr) for block in self.blocks]

    def _step(self, latent, timestep, pairs):
        """The step from each block's (k, v), (B*F, H*W, D) each."""
        B, C, Fr, h, w = latent.shape
        pt, ph, pw = self.cfg.patch_size
        cfg, emb = self.cfg, self.condition_embedder
        x = self.patch_embedding(latent)  # (B, D, T, H, W) token grid
        grid = tuple(x.shape[2:])
        T, H, W = grid
        x = x.flatten(2).transpose(1, 2)  # (B, T*H*W, D), t-major
        temb = emb.time_embedder(timestep_features(timestep, cfg.freq_dim))  # (B, D)
        mod = emb.time_proj(F.silu(temb)).unflatten(1, (emb.n_mod, cfg.dim))  # (B, n_mod, D)
        rope_video = rope_tables(grid, cfg.head_dim, cfg.rope_theta)
        for block, (k, v) in zip(self.blocks, pairs):
            x = block(x, mod, k, v, rope_video, grid)
        shift, scale = (self.scale_shift_table + temb[:, None]).chunk(2, dim=1)
        x = self.proj_out(modulate(self.norm_out(x), shift, scale))  # (B, L, pt*ph*pw*C)
        x = x.reshape(B, T, H, W, pt, ph, pw, C)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, T, pt, H, ph, W, pw)
        return x.reshape(B, C, T * pt, H * ph, W * pw)


def stage_view(dit: WanDiT, method: str) -> WanDiT:
    """`dit` exported through another of its methods: `reference_kv` (the `dit_context` stage of
    `--text-kv` builds: ref_latent, motion -> ref_kv) or `step` (their `dit`: latent, timestep,
    ref_kv -> velocity). A shallow copy sharing its modules and weights; not a wrapper module,
    so the graph's module paths stay 'blocks.0.attn2...', the names the precision recipes
    (engines/int8.py, engines/fp16.py) and --int8-float-layers match."""
    view = copy.copy(dit)
    view.forward = getattr(view, method)  # an instance attribute: nn.Module calls self.forward
    return view
