"""Export one stage to ONNX from its StageSpec, and check the graph against PyTorch.

The exporter is `torch.onnx.export(dynamo=True)` (the TorchScript exporter fails on rms_norm);
dynamic axes come from the spec's symbolic dims as named `torch.export.Dim`s, and the graph's
axis names are rewritten to the spec's expressions ("4*F-3", "16*Hp", ...) so a reader of the
ONNX file sees the same names as the manifest. Weights go to external data (`<stage>.onnx.data`),
which is what multi-GB models need anyway.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import time
import warnings
from pathlib import Path

import onnx
import torch

from engines.quality import compare, worst
from runtime.stages import StageSpec, SymbolRange

log = logging.getLogger(__name__)

DEFAULT_OPSET = 20  # every ONNX Runtime and TensorRT 10.x reads it

# Validation shapes: the first is the trace shape (distinct sizes so no two axes get unified,
# no 1s so nothing specializes), the second checks that the graph really is dynamic and covers
# the 1-frame clip the reference image is. Hp/Wp stay small: validation runs on the CPU.
EXPORT_ENV = {"B": 2, "F": 3, "Hp": 2, "Wp": 4}
SECOND_ENV = {"B": 1, "F": 1, "Hp": 3, "Wp": 2}

# Max abs error / max |reference| allowed between ONNX Runtime fp32 and PyTorch fp32.
FP32_TOLERANCE = 1e-4


def torch_dynamic_shapes(spec: StageSpec, symbols: dict[str, SymbolRange]) -> tuple:
    """One {axis: Dim} per input, in order (positional, so a `*caches` forward works too)."""
    dims = {s: torch.export.Dim(s, min=r.min, max=r.max) for s, r in symbols.items()}
    shapes = []
    for t in spec.inputs:
        axes = {}
        for i, d in enumerate(t.dims):
            if d.symbol is not None:
                axes[i] = dims[d.symbol] * d.scale + d.offset if (d.scale, d.offset) != (1, 0) else dims[d.symbol]
        shapes.append(axes)
    return tuple(shapes)


def _nest_varargs(module: torch.nn.Module, shapes: tuple) -> tuple:
    """torch.export binds a `*caches` parameter as one tuple (none when it is given nothing);
    shape it the same way."""
    params = list(inspect.signature(module.forward).parameters.values())
    for i, p in enumerate(params):
        if p.kind is inspect.Parameter.VAR_POSITIONAL and len(shapes) > i:
            return (*shapes[:i], tuple(shapes[i:]))
    return shapes


def name_axes(model, spec: StageSpec) -> None:
    """Rewrite the graph's input/output axis names (an onnx_ir model) to the spec's expressions."""
    import onnx_ir as ir

    by_name = {t.name: t for t in spec.inputs + spec.outputs}
    for value in (*model.graph.inputs, *model.graph.outputs):
        value.shape = ir.Shape([d.offset if d.symbol is None else str(d) for d in by_name[value.name].dims])


def export_stage(module: torch.nn.Module, spec: StageSpec, symbols: dict[str, SymbolRange],
                 path: Path, opset: int = DEFAULT_OPSET, translations: dict | None = None) -> None:
    """Export `module` (whose forward takes the spec's inputs in order) to `path`.
    `translations`: custom ops -> ONNX (export/kernels.py's contrib-op lowering)."""
    sample = spec.sample_inputs(EXPORT_ENV)
    args = tuple(torch.from_numpy(sample[t.name]) for t in spec.inputs)
    t0 = time.perf_counter()
    # The exporter narrates every pass on stdout; keep it for --debug only.
    quiet = io.StringIO()
    # torch.onnx also warns through logging about optional packages (torchvision) it never needs.
    torch_onnx_log = logging.getLogger("torch.onnx")
    level = torch_onnx_log.level
    if not log.isEnabledFor(logging.DEBUG):
        torch_onnx_log.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=opset,
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_shapes=_nest_varargs(module, torch_dynamic_shapes(spec, symbols)),
            custom_translation_table=translations,
        )
    torch_onnx_log.setLevel(level)
    log.debug(quiet.getvalue())
    import onnx_ir as ir

    # Saved from the exporter's IR, which writes each weight straight from the module's tensor
    # to the external data: `program.model_proto` would first copy every weight into one
    # protobuf (a third copy of a multi-GB model, beside the module and the validating session).
    name_axes(program.model, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_name(f"{path.name}.data").unlink(missing_ok=True)
    ir.save(program.model, path, external_data=f"{path.name}.data", size_threshold_bytes=1024)
    del program
    onnx.checker.check_model(str(path))
    log.debug("exported %s in %.1f s", path.name, time.perf_counter() - t0)


def validate_stage(module: torch.nn.Module, spec: StageSpec, path: Path,
                   tolerance: float = FP32_TOLERANCE) -> dict:
    """Run the graph in ONNX Runtime and the module in PyTorch at two shapes; worst errors."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # Without prepacking, ONNX Runtime runs the weights from the memory-mapped external data
    # instead of repacking a copy of every MatMul weight (measured: +518 MB for a 453 MB DiT):
    # the check then holds no second copy of the model beside PyTorch's.
    opts.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    results, shapes = [], []
    for seed, env in enumerate((EXPORT_ENV, SECOND_ENV)):
        inputs = spec.sample_inputs(env, seed=seed)
        with torch.no_grad():
            ref = module(*(torch.from_numpy(inputs[t.name]) for t in spec.inputs))
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = session.run([t.name for t in spec.outputs], inputs)
        results.extend(compare(r.numpy(), g) for r, g in zip(ref, got))
        shapes.append({t.name: list(t.shape(env)) for t in spec.inputs})
    w = worst(results)
    return {**w, "tolerance": tolerance, "metric": "max_abs / max|torch|",
            "passed": w["finite"] and w["max_rel"] <= tolerance, "shapes": shapes}
