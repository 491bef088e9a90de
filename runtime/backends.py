"""Running a stage graph: ONNX Runtime sessions fed by name with explicit dtypes.

A `StageSession` holds one stage's spec and session. At load the graph's inputs and outputs
are checked against the spec (a graph swapped for another is refused then, not at its first
call); each call checks the inputs against the spec (a wrong shape is a bug upstream, reported
with names rather than an ORT stack trace) and the outputs for NaN/Inf, once per call, so a
diverging stage stops the run in one line instead of writing a garbage video.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.errors import NonFiniteError, WanError, is_out_of_memory
from runtime.manifest import Manifest
from runtime.request import check_threads
from runtime.stages import StageSpec

log = logging.getLogger(__name__)


BACKENDS = ("onnxruntime", "tensorrt")


def available_providers() -> list[str]:
    """TensorRT or CUDA execution providers when onnxruntime-gpu has them, else the CPU.
    (ONNX Runtime falls through the list when a provider cannot start.)"""
    have = ort.get_available_providers()
    wanted = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    return [p for p in wanted if p in have]


def check_finite(stage: str, outputs: dict, xp=np) -> dict:
    """`outputs` unchanged if every value is finite, else a NonFiniteError naming the stage."""
    for name, value in outputs.items():
        if not bool(xp.isfinite(value).all()):
            raise NonFiniteError(f"stage {stage} produced NaN or Inf in its output '{name}'")
    return outputs


def out_of_memory(stage: str, inputs: dict) -> WanError:
    name, first = next(iter(inputs.items()))
    more = f" and {len(inputs) - 1} more inputs" if len(inputs) > 1 else ""
    return WanError(f"out of memory running stage {stage} ({name} {tuple(first.shape)}{more}); nothing "
                    "was written: ask for fewer frames or a smaller size")


def _ort_dtype(text: str) -> str:
    """ONNX Runtime's 'tensor(float)' -> numpy's 'float32'."""
    name = text.removeprefix("tensor(").removesuffix(")")
    return {"float": "float32", "double": "float64"}.get(name, name)


@dataclass
class StageSession:
    spec: StageSpec
    session: ort.InferenceSession
    path: Path  # the graph it runs

    def __post_init__(self):
        io = [[(a.name, _ort_dtype(a.type), a.shape) for a in args]
              for args in (self.session.get_inputs(), self.session.get_outputs())]
        self.spec.check_graph(*io, where=str(self.path))

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        self.spec.bind(inputs)
        names = [t.name for t in self.spec.outputs]
        try:
            values = self.session.run(names, inputs)
        except Exception as exc:  # ONNX Runtime raises its own types
            if is_out_of_memory(exc):
                raise out_of_memory(self.spec.name, inputs) from None
            raise
        return check_finite(self.spec.name, dict(zip(names, values)))


class OnDemandStage:
    """A stage opened at its first call and closed by `release()` (--low-memory: the encoders
    after encoding, each A14B expert when the other takes over), for any backend's stages."""

    def __init__(self, spec: StageSpec, open_stage):
        self.spec, self._open, self.stage = spec, open_stage, None

    def __call__(self, **inputs):
        if self.stage is None:
            self.stage = self._open()
        return self.stage(**inputs)

    @property
    def loaded(self) -> bool:
        return self.stage is not None

    def release(self) -> None:
        if self.stage is not None:
            close = getattr(self.stage, "close", None)
            if close is not None:
                close()
            self.stage = None
            gc.collect()  # the session's weights go now, before the next stage is opened


def open_stages(root: Path, manifest: Manifest, precision: str = "fp32",
                threads: int | None = None, contrib_ops: bool = True,
                on_demand: tuple[str, ...] = ()) -> dict[str, StageSession]:
    """One ONNX Runtime session per stage at `precision`: the stage's ONNX Runtime graph
    (fused contrib ops) where one was built and `contrib_ops`, else its portable graph.
    Stages named in `on_demand` open at their first call (`OnDemandStage`)."""
    built = manifest.precisions()
    if precision not in built:
        raise WanError(f"precision {precision!r} was not built in '{root}' (built: "
                       f"{', '.join(built) or 'none'}); rebuild with wan-export --precision {precision}")
    threads = check_threads(threads)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    # ORT warns about unused initializers on every load, and logs a failed run (out of memory)
    # in colour before raising it; the exception becomes the one line. --debug shows ORT's logs.
    opts.log_severity_level = 0 if log.isEnabledFor(logging.DEBUG) else 4
    providers = available_providers()

    def load(path: Path) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise WanError(f"ONNX Runtime cannot load '{path}': {str(exc).splitlines()[0]}")

    def open_one(name: str) -> StageSession:
        art = manifest.stages[name].artifacts[precision]
        spec, path = manifest.stages[name].spec, root / art.path
        if contrib_ops and art.ort_graph is not None:
            fused = root / art.ort_graph["path"]
            try:
                session = load(fused)
            except WanError as exc:  # an ONNX Runtime build without these contrib ops
                log.warning("%s; running the portable graph instead", exc)
            else:
                return StageSession(spec, session, fused)
        return StageSession(spec, load(path), path)

    sessions = {name: OnDemandStage(stage.spec, lambda name=name: open_one(name)) if name in on_demand
                else open_one(name) for name, stage in manifest.stages.items()}
    log.debug("opened %s stages with %s", precision, providers)
    return sessions


class OnnxRuntimeBackend:
    """Stage sessions on ONNX Runtime; arrays are numpy arrays on the host."""

    xp = np

    def __init__(self, root: Path, manifest: Manifest, precision: str = "fp32",
                 threads: int | None = None, contrib_ops: bool = True, on_demand: tuple[str, ...] = ()):
        self.stages = open_stages(root, manifest, precision, threads, contrib_ops, on_demand)

    @staticmethod
    def to_device(a: np.ndarray) -> np.ndarray:
        return a

    @staticmethod
    def to_host(a) -> np.ndarray:
        return np.asarray(a)


def open_backend(name: str, root: Path, manifest: Manifest, precision: str,
                 threads: int | None = None, on_demand: tuple[str, ...] = ()):
    """The backend `name` ("onnxruntime" or "tensorrt") over `root`'s artifacts; the stages in
    `on_demand` open when first called and close on `release()`."""
    if name == "onnxruntime":
        return OnnxRuntimeBackend(root, manifest, precision, threads, on_demand=on_demand)
    if name == "tensorrt":
        from runtime.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(root, manifest, precision, on_demand)
    raise WanError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
