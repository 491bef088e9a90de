"""ONNX graph helpers shared by the precision passes: load/save, module scopes, activation ranges.

The dynamo exporter records, for every node, the PyTorch module path it came from
(`pkg.torch.onnx.name_scopes`), so layers can be chosen by the names a model author knows
("condition_embedder*", "blocks.3.ffn*") instead of by generated node names.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import numpy as np
import onnx

SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path))  # with external data


def save(model: onnx.ModelProto, path: Path) -> None:
    """Save with weights as external data in `<name>.data`, like the fp32 export."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_name(f"{path.name}.data").unlink(missing_ok=True)  # onnx appends to an existing one
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}.data")


def module_path(node: onnx.NodeProto) -> str:
    """The innermost PyTorch module the node came from, e.g. 'blocks.0.attn1.to_q' ('' if none)."""
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            scopes = ast.literal_eval(prop.value)  # ['', 'blocks.0', 'blocks.0.attn1', ..., op]
            return scopes[-2] if len(scopes) >= 2 else ""
    return ""


def nodes_matching(model: onnx.ModelProto, patterns: list[str],
                   op_types: list[str] | None = None) -> list[str]:
    """Names of nodes (of `op_types`, default any) whose module path matches any glob pattern."""
    out = []
    for node in model.graph.node:
        if op_types is not None and node.op_type not in op_types:
            continue
        path = module_path(node)
        if any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, p + ".*") for p in patterns):
            out.append(node.name)
    return out


def activation_ranges(path: Path, samples: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Max |value| of every float tensor in the graph over `samples` (ONNX Runtime, fp32)."""
    import onnxruntime as ort

    model = onnx.load(str(path))
    model = onnx.shape_inference.infer_shapes(model)
    typed = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    have = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in have and typed.get(name) == onnx.TensorProto.FLOAT:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
                have.add(name)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    ranges: dict[str, float] = {}
    for sample in samples:
        for name, value in zip(names, session.run(names, sample)):
            if value.dtype == np.float32 and value.size:
                ranges[name] = max(ranges.get(name, 0.0), float(np.abs(value).max()))
    return ranges
