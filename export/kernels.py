"""The DiT's two fusable kernels, and the two ways they reach an ONNX graph.

`Attention` (export/dit.py) calls its attention core and its rotary embedding through a
`Kernels` pair, on tokens in (batch, sequence, heads * head_dim) layout:

    attention(q, k, v, heads)    (B, S, D), (B, L, D), (B, L, D) -> (B, S, D):
                                 softmax(q k^T / sqrt(d)) v for each of `heads` heads
    rotary(x, cos, sin, heads)   (B, L, D) -> (B, L, D): each head's channel pairs rotated by
                                 the per-token angles of a (L, d/2) table (export/rope.py)
    rotary_each(x, cos, sin, heads)   the same with a (B, L, d/2) table: angles of their own
                                 for every batch item (the reference keys, placed per frame)

TORCH is plain PyTorch. The model trains with it, and the portable graphs are exported from it:
MatMul/Softmax/elementwise ops that every ONNX runtime and TensorRT read.

ONNX_RUNTIME runs the very same functions in PyTorch, wrapped as the custom ops `wan::attention`,
`wan::rotary` and `wan::rotary_each`, which the exporter writes as ONNX Runtime's contrib ops
com.microsoft.MultiHeadAttention and com.microsoft.RotaryEmbedding (`small`'s DiT: 615 nodes
instead of 1,206). Such a graph runs only in ONNX Runtime, so it is an extra graph next to the
portable one (DESIGN: keep plain and ORT-only graphs apart). On the CPU it takes ~40% off a
`small` DiT step (26.8 -> 16.4 ms), and without it int8 gains nothing (README, Performance).

RotaryEmbedding takes a cos/sin *cache* indexed by position ids; passing the (L, d/2) table of
this grid as the cache with position ids 0..L-1 (`position_ids = [0]`: consecutive from 0)
applies an arbitrary per-token rotation, which is what the 3D RoPE is. For `rotary_each` the
(B, L, d/2) table is flattened into a (B*L, d/2) cache and the position ids are (B, L), item b's
being b*L .. b*L+L-1: one fused op instead of a dozen elementwise ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from export.rope import apply_rope


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    split = lambda t: t.unflatten(2, (heads, -1)).transpose(1, 2)  # noqa: E731 - (B, heads, S, d)
    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    return apply_rope(x.unflatten(2, (heads, -1)), cos, sin).flatten(2)  # via (B, L, heads, d)


@dataclass(frozen=True)
class Kernels:
    name: str
    attention: Callable[..., torch.Tensor]
    rotary: Callable[..., torch.Tensor]
    rotary_each: Callable[..., torch.Tensor]


TORCH = Kernels("torch", attention, rotary, rotary)  # apply_rope takes either table shape


# --- the ONNX Runtime lowering ----------------------------------------------------------------

@torch.library.custom_op("wan::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    return attention(q, k, v, heads)


@_attention_op.register_fake
def _(q, k, v, heads):
    return q.new_empty(q.shape[:2] + v.shape[2:])


def _rotary_custom_op(name: str):
    """`rotary` as the custom op wan::<name>: the same PyTorch function, one ONNX lowering per
    name (the shared-table and the per-item rotation lower differently)."""
    @torch.library.custom_op(f"wan::{name}", mutates_args=())
    def op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
        return rotary(x, cos, sin, heads)

    @op.register_fake
    def _(x, cos, sin, heads):
        return torch.empty_like(x)

    return op


ONNX_RUNTIME = Kernels("onnxruntime", _attention_op, _rotary_custom_op("rotary"),
                       _rotary_custom_op("rotary_each"))

CONTRIB_DOMAIN = "com.microsoft"
CONTRIB_OPS = ("MultiHeadAttention", "RotaryEmbedding")


def _register_contrib_schemas() -> None:
    """The exporter builds nodes through onnxscript, which wants an op schema; ONNX itself does
    not know ONNX Runtime's contrib ops, so declare the inputs and attributes used here."""
    import onnx
    from onnx.defs import OpSchema

    def declare(name: str, inputs: list[tuple[str, str]], attributes: list[str]) -> None:
        if onnx.defs.has(name, CONTRIB_DOMAIN):
            return
        onnx.defs.register_schema(OpSchema(
            name, CONTRIB_DOMAIN, 1,
            inputs=[OpSchema.FormalParameter(n, t) for n, t in inputs],
            outputs=[OpSchema.FormalParameter("output", "T")],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "activations"),
                              ("M", ["tensor(int64)"], "position ids")],
            attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "") for a in attributes]))

    declare("MultiHeadAttention", [("query", "T"), ("key", "T"), ("value", "T")], ["num_heads"])
    declare("RotaryEmbedding", [("input", "T"), ("position_ids", "M"), ("cos_cache", "T"),
                                ("sin_cache", "T")], ["num_heads", "interleaved"])


def onnx_runtime_translations() -> dict:
    """`custom_translation_table` for torch.onnx.export: the custom ops -> contrib ops."""
    import onnxscript
    from onnxscript import opset20 as op

    _register_contrib_schemas()
    ms = onnxscript.values.Opset(CONTRIB_DOMAIN, 1)
    mha = onnxscript.values.Op(ms, "MultiHeadAttention")
    rope = onnxscript.values.Op(ms, "RotaryEmbedding")

    def attention_onnx(q, k, v, heads: int):
        return mha(q, k, v, num_heads=heads)  # scale defaults to 1/sqrt(head_dim), like SDPA

    def rotary_onnx(x, cos, sin, heads: int):
        # Pairs (2i, 2i+1) rotate together ("interleaved"), as in apply_rope.
        return rope(x, op.Constant(value_ints=[0]), cos, sin, interleaved=1, num_heads=heads)

    def rotary_each_onnx(x, cos, sin, heads: int):
        rows = op.Shape(cos, start=0, end=2)  # [B, L]
        half = op.Shape(cos, start=2)  # [d/2]
        cache_shape = op.Concat(op.Constant(value_ints=[-1]), half, axis=0)
        count = op.ReduceProd(rows, keepdims=0)  # B*L, a scalar
        ids = op.Reshape(op.Range(op.Constant(value_int=0), count, op.Constant(value_int=1)), rows)
        return rope(x, ids, op.Reshape(cos, cache_shape), op.Reshape(sin, cache_shape), interleaved=1,
                    num_heads=heads)

    return {torch.ops.wan.attention.default: attention_onnx, torch.ops.wan.rotary.default: rotary_onnx,
            torch.ops.wan.rotary_each.default: rotary_each_onnx}
