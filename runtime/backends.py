"""Running a stage graph: ONNX Runtime sessions fed by name with explicit dtypes.

A `StageSession` holds one stage's spec and session; calling it checks the inputs against the
spec (a wrong shape is a bug upstream, reported with names rather than an ORT stack trace).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.errors import WanError
from runtime.manifest import Manifest
from runtime.stages import StageSpec

log = logging.getLogger(__name__)


BACKENDS = ("onnxruntime", "tensorrt")


def available_providers() -> list[str]:
    """TensorRT or CUDA execution providers when onnxruntime-gpu has them, else the CPU.
    (ONNX Runtime falls through the list when a provider cannot start.)"""
    have = ort.get_available_providers()
    wanted = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    return [p for p in wanted if p in have]


@dataclass
class StageSession:
    spec: StageSpec
    session: ort.InferenceSession
    path: Path  # the graph it runs

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        self.spec.bind(inputs)
        names = [t.name for t in self.spec.outputs]
        return dict(zip(names, self.session.run(names, inputs)))


def open_stages(root: Path, manifest: Manifest, precision: str = "fp32",
                threads: int | None = None, contrib_ops: bool = True) -> dict[str, StageSession]:
    """One ONNX Runtime session per stage at `precision`: the stage's ONNX Runtime graph
    (fused contrib ops) where one was built and `contrib_ops`, else its portable graph."""
    built = manifest.precisions()
    if precision not in built:
        raise WanError(f"precision {precision!r} was not built in '{root}' (built: "
                       f"{', '.join(built) or 'none'}); rebuild with wan-export --precision {precision}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # ORT warns about unused initializers etc. on every load
    providers = available_providers()

    def load(path: Path) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise WanError(f"ONNX Runtime cannot load '{path}': {str(exc).splitlines()[0]}")

    sessions = {}
    for name, stage in manifest.stages.items():
        art = stage.artifacts[precision]
        path = root / art.path
        if contrib_ops and art.ort_graph is not None:
            fused = root / art.ort_graph["path"]
            try:
                sessions[name] = StageSession(stage.spec, load(fused), fused)
                continue
            except WanError as exc:  # an ONNX Runtime build without these contrib ops
                log.warning("%s; running the portable graph instead", exc)
        sessions[name] = StageSession(stage.spec, load(path), path)
    log.debug("opened %s stages with %s", precision, providers)
    return sessions


class OnnxRuntimeBackend:
    """Stage sessions on ONNX Runtime; arrays are numpy arrays on the host."""

    xp = np

    def __init__(self, root: Path, manifest: Manifest, precision: str = "fp32",
                 threads: int | None = None, contrib_ops: bool = True):
        self.stages = open_stages(root, manifest, precision, threads, contrib_ops)

    @staticmethod
    def to_device(a: np.ndarray) -> np.ndarray:
        return a

    @staticmethod
    def to_host(a) -> np.ndarray:
        return np.asarray(a)


def open_backend(name: str, root: Path, manifest: Manifest, precision: str,
                 threads: int | None = None):
    """The backend `name` ("onnxruntime" or "tensorrt") over `root`'s artifacts."""
    if name == "onnxruntime":
        return OnnxRuntimeBackend(root, manifest, precision, threads)
    if name == "tensorrt":
        from runtime.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(root, manifest, precision)
    raise WanError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
