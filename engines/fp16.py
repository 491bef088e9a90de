"""fp16 with fp32 islands: half precision only where it pays and is safe.

Every released Wan runtime keeps norms, modulation and the residual stream in fp32, because
fp16 overflows there in DiTs. The recipe here turns it around: only the heavy ops (MatMul,
Gemm, Conv, and the attention Softmax) run in fp16, and of those only the ones whose measured
inputs and outputs stay well inside the fp16 range on calibration data; everything else
(LayerNorm/RMSNorm arithmetic, adaLN modulation, residual adds, RoPE, embedders, the head) stays
fp32. Weights of fp16 ops are stored in fp16; activations are cast at the island borders, and
two fp16 ops in a row (QK^T -> Softmax -> AV) pass fp16 directly. Graph I/O stays fp32.

(onnxruntime's `convert_float_to_float16` does the opposite - every tensor fp16 unless its
node is blocked, with fp16 casts *between* blocked nodes - which would round the residual
stream to fp16, and it leaves mixed-type constants that TensorRT rejects.)
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engines import graph

log = logging.getLogger(__name__)

FP16_OPS = ("MatMul", "Gemm", "Conv", "Softmax")
FP16_MAX = 65504.0
# An op stays fp32 when a tensor it reads or writes reached this on calibration data: 8x
# headroom below the fp16 maximum for inputs the calibration set did not cover.
RANGE_LIMIT = FP16_MAX / 8
# Small layers whose fp16 savings are nil but whose errors feed every token (DiT embedders,
# modulation projection, head); matched against the PyTorch module path.
ALWAYS_FP32 = ("condition_embedder", "patch_embedding", "proj_out")


def choose_fp16_nodes(model: onnx.ModelProto, ranges: dict[str, float],
                      always_fp32: tuple[str, ...] = ALWAYS_FP32) -> tuple[set[str], dict]:
    """The nodes that run in fp16, and why each other heavy node stays fp32 (`always_fp32`:
    module-path patterns kept fp32 whatever their range; each model family names its own)."""
    always = set(graph.nodes_matching(model, list(always_fp32)))
    chosen, reasons, too_large = set(), Counter(), []
    for node in model.graph.node:
        if node.op_type not in FP16_OPS:
            reasons["not a heavy op (norms, modulation, residual adds, RoPE, reshapes)"] += 1
        elif node.name in always:
            reasons["embedder / modulation / head layer"] += 1
        elif max((ranges.get(t, 0.0) for t in (*node.input, *node.output)), default=0.0) > RANGE_LIMIT:
            reasons[f"measured |x| > {RANGE_LIMIT:g}"] += 1
            too_large.append(node.name)
        else:
            chosen.add(node.name)
    return chosen, {"fp32_reasons": dict(reasons), "fp32_by_range": too_large}


def to_mixed_precision(model: onnx.ModelProto, fp16_nodes: set[str]) -> onnx.ModelProto:
    """Rewrite `model` in place so that exactly `fp16_nodes` compute in fp16."""
    inits = {t.name: t for t in model.graph.initializer}
    half_of: dict[str, str] = {}  # fp32 tensor -> its fp16 twin (cast, converted weight, or fp16 output)
    new_nodes, new_inits = [], []

    def half(name: str) -> str:
        if name not in half_of:
            twin = f"{name}__fp16"
            if name in inits:  # weights: convert once, offline
                new_inits.append(numpy_helper.from_array(
                    numpy_helper.to_array(inits[name]).astype(np.float16), twin))
            else:
                new_nodes.append(helper.make_node("Cast", [name], [twin], to=TensorProto.FLOAT16,
                                                  name=f"{twin}_cast"))
            half_of[name] = twin
        return half_of[name]

    for node in model.graph.node:
        if node.name in fp16_nodes:
            for i, name in enumerate(node.input):
                if name:
                    node.input[i] = half(name)
            for i, name in enumerate(node.output):
                twin = f"{name}__fp16"
                node.output[i] = twin
                half_of[name] = twin
                new_nodes.append(node)
                node = helper.make_node("Cast", [twin], [name], to=TensorProto.FLOAT,
                                        name=f"{name}_to_fp32")  # fp32 readers see fp32
        new_nodes.append(node)
    # Drop what nothing reads any more: fp32 weights now stored as fp16, unused border casts.
    del model.graph.node[:]
    model.graph.node.extend(_live(new_nodes, {o.name for o in model.graph.output}))
    model.graph.initializer.extend(new_inits)
    read = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in read]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    del model.graph.value_info[:]  # stale fp32 annotations; shapes are inferred again on load
    return model


def _live(nodes: list, outputs: set[str]) -> list:
    """Nodes whose outputs are read by a later node or are graph outputs (drops dead casts)."""
    needed, keep = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output) or node.op_type != "Cast":
            keep.append(node)
            needed.update(node.input)
    return keep[::-1]


def convert(src: Path, dst: Path, samples: list[dict[str, np.ndarray]],
            always_fp32: tuple[str, ...] = ALWAYS_FP32) -> dict:
    """Write the mixed-precision graph of `src` to `dst`; returns what stayed fp32 and why."""
    ranges = graph.activation_ranges(src, samples)
    model = graph.load(src)
    fp16_nodes, report = choose_fp16_nodes(model, ranges, always_fp32)
    graph.save(to_mixed_precision(model, fp16_nodes), dst)
    log.debug("fp16 %s: %d nodes in fp16", dst.name, len(fp16_nodes))
    return {
        "recipe": f"fp16 for {', '.join(FP16_OPS)} within the measured range limit; all else fp32",
        "fp16_nodes": len(fp16_nodes),
        **report,
        "range_limit": RANGE_LIMIT,
        "max_activation": max(ranges.values(), default=0.0),
        "calibration_samples": len(samples),
    }


def emulate(src: Path, dst: Path) -> None:
    """Write `src`'s mixed-precision graph as an fp32 graph that rounds every fp16 tensor to
    fp16 (explicit Cast pairs): fp16 storage with fp32 arithmetic, as fp16 GPU kernels with
    fp32 accumulation compute. For measuring fp16 on a CPU, where ONNX Runtime has no fp16
    MatMul/Conv kernels, casts their inputs back to fp32 and then drops the fp32 -> fp16 ->
    fp32 pairs, so the graph as built would run with unrounded activations."""
    model = graph.load(src)
    for i, t in enumerate(model.graph.initializer):
        if t.data_type == TensorProto.FLOAT16:  # fp16 weights as exact fp32 copies
            model.graph.initializer[i].CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))

    def rounded(src_name: str, dst_name: str) -> list:
        mid = f"{dst_name}__rounded"
        return [helper.make_node("Cast", [src_name], [mid], to=TensorProto.FLOAT16, name=f"{mid}_to_fp16"),
                helper.make_node("Cast", [mid], [dst_name], to=TensorProto.FLOAT, name=f"{mid}_to_fp32")]

    nodes = []
    for node in model.graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None
        if to == TensorProto.FLOAT16:  # into an island: round
            nodes += rounded(node.input[0], node.output[0])
        elif to == TensorProto.FLOAT and node.input[0].endswith("__fp16"):  # out of one: already fp32
            nodes.append(helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name))
        elif any(o.endswith("__fp16") for o in node.output):  # an fp16 op: fp32 math, rounded result
            outputs = list(node.output)
            del node.output[:]
            node.output.extend(f"{o}__fp32" for o in outputs)
            nodes.append(node)
            for o in outputs:
                nodes += rounded(f"{o}__fp32", o)
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    graph.save(model, dst)
