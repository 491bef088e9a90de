"""3D rotary position embedding with real cos/sin tables (complex tensors do not export).

Wan's split of a head dim d: t gets d - 4*(d//6) channels, h and w get 2*(d//6) each, in that
order, theta 10000, positions are the integer (t, h, w) token-grid indices. Channels rotate in
consecutive pairs (2i, 2i+1), which is what Wan's complex view of the head dim does.

In factorized attention the full 3D rotation is still applied: within one spatial sequence all
tokens share t, so the t-angle cancels in q.k (and likewise h, w in a temporal sequence).
"""

from __future__ import annotations

import torch


def axes_dims(head_dim: int) -> tuple[int, int, int]:
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _freqs(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (dim/2,)


def rope_tables(grid: tuple, head_dim: int, theta: float, t_offset: int = 0):
    """cos, sin tables of shape (T*H*W, head_dim/2) for a (T, H, W) token grid in t, h, w order."""
    T, H, W = grid
    angles = []
    for size, dim, axis in zip((T, H, W), axes_dims(head_dim), range(3)):
        pos = torch.arange(size, dtype=torch.float32) + (t_offset if axis == 0 else 0)
        a = pos[:, None] * _freqs(dim, theta)[None, :]  # (size, dim/2)
        view = [1, 1, 1, dim // 2]
        view[axis] = size
        angles.append(a.view(view).expand(T, H, W, dim // 2))
    a = torch.cat(angles, dim=-1).reshape(T * H * W, head_dim // 2)  # (L, d/2)
    return torch.cos(a), torch.sin(a)


def rope_at(h: torch.Tensor, w: torch.Tensor, head_dim: int, theta: float):
    """cos, sin tables (..., d/2) for tokens at t = 0 and real-valued grid positions h, w (...):
    the reference keys wherever a motion carries them (export/dit.py)."""
    dt, dh, dw = axes_dims(head_dim)
    a = torch.cat([torch.zeros_like(h)[..., None].expand(*h.shape, dt // 2), h[..., None] * _freqs(dh, theta),
                   w[..., None] * _freqs(dw, theta)], dim=-1)  # (..., d/2)
    return torch.cos(a), torch.sin(a)


def apply_rope(x, cos, sin):
    """Rotate x (B, L, heads, d) by per-token angles; cos/sin (L, d/2), the same for every
    batch item, or (B, L, d/2)."""
    x = x.unflatten(-1, (-1, 2))  # (B, L, heads, d/2, 2)
    x0, x1 = x[..., 0], x[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (L, 1, d/2) or (B, L, 1, d/2)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
