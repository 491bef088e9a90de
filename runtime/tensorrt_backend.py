"""TensorRT backend: the artifact directory's `.plan` engines on an NVIDIA GPU.

Latents stay on the GPU across steps (cupy arrays: the solvers and CFG are plain array
arithmetic, so the numpy code runs on them unchanged), the three stages share one activation
buffer (they never run at the same time; each context is created with user-managed memory and
pointed at the same allocation), and CFG is one batch-2 call. Needs `tensorrt` or
`tensorrt_rtx` (whichever built the engines) and `cupy`; without a GPU it refuses in one line.

Before any engine is loaded, `check_engines` compares the manifest with this machine: the
precision was built with engines, the TensorRT flavour and version match the builder's, and
the GPU is one the engines were built for. Shapes are checked per call against each engine's
profile, which the manifest records.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import numpy as np

from runtime.backends import OnDemandStage, check_finite
from runtime.errors import WanError
from runtime.manifest import Manifest
from runtime.stages import StageSpec

log = logging.getLogger(__name__)

MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}


def engines_of(manifest: Manifest, precision: str, root: Path) -> dict[str, dict]:
    """Stage -> engine record for `precision`, or a one-line error saying what to rebuild."""
    built = manifest.precisions()
    if precision not in built:
        raise WanError(f"precision {precision!r} was not built in '{root}' (built: {', '.join(built)}); "
                       f"rebuild with wan-export --precision {precision} --tensorrt")
    engines = {name: s.artifacts[precision].engine for name, s in manifest.stages.items()}
    if any(e is None for e in engines.values()):
        raise WanError(f"'{root}' has no TensorRT engines for {precision}; rebuild with "
                       f"wan-export --precision {precision} --tensorrt")
    return engines


def check_engines(engines: dict[str, dict], root: Path, flavour: str, version: str,
                  compute_capability: str, supported: list[str] | None = None) -> None:
    """Refuse engines from another TensorRT flavour/version or built for another GPU.

    `compute_capability` is this GPU's, as "SM86". Engines record their targets; "builder
    default" (TensorRT-RTX without explicit targets) means every architecture it supports.
    `supported`: the architectures the installed TensorRT-RTX can target at all (its
    `ComputeCapability` enum); it has no datacenter Hopper/Blackwell (SM90, SM100), and on
    those its engines fail to load with no reason given, so this says so first.
    """
    if supported is not None and compute_capability not in supported:
        raise WanError(f"{flavour} {version} does not run on this GPU ({compute_capability}; it "
                       f"supports {', '.join(sorted(supported))}): build the engines with the full "
                       "TensorRT on this machine (pip install tensorrt; wan-export --tensorrt "
                       "--trt-flavour tensorrt), or use --backend onnxruntime")
    for name, e in engines.items():
        b = e["builder"]
        if b["flavour"] != flavour or b["version"] != version:
            raise WanError(f"engine {e['path']} was built with {b['flavour']} {b['version']}, this "
                           f"runtime has {flavour} {version}; rebuild '{root}' with wan-export --tensorrt")
        targets = e["compute_capabilities"]
        if "builder default" not in targets and compute_capability not in targets:
            raise WanError(f"engine {e['path']} targets {', '.join(targets)}, this GPU is "
                           f"{compute_capability}; rebuild '{root}' with wan-export --tensorrt "
                           f"--compute-capability {compute_capability}")


def check_profile(engine: dict, name: str, env: dict[str, int]) -> None:
    """A shape outside the engine's optimization profile: say which value and the range."""
    for sym, (lo, _, hi) in engine["symbols"].items():
        if sym in env and not lo <= env[sym] <= hi:
            raise WanError(f"{name} engine accepts {sym} from {lo} to {hi}, got {env[sym]}; "
                           "rebuild with wan-export --tensorrt --min/--max covering this video")


def engine_io(engine, trt) -> tuple[list[tuple], list[tuple]]:
    """An engine's (name, numpy dtype, shape) inputs and outputs, as `StageSpec.check_graph`
    takes them (TensorRT gives -1 for a dynamic axis)."""
    io: tuple[list, list] = ([], [])
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        io[0 if is_input else 1].append((name, dtype, tuple(engine.get_tensor_shape(name))))
    return io


class TensorRTStage:
    """One engine with its execution context; called with and returning cupy arrays."""

    def __init__(self, name: str, spec: StageSpec, engine, record: dict, cp, stream):
        self.name, self.spec, self.engine, self.record = name, spec, engine, record
        self.cp, self.stream = cp, stream
        self.context = None  # created by the backend with the shared activation buffer

    def close(self) -> None:
        """Free the engine and its context (--low-memory, between uses), and hand the freed cupy
        blocks back to the driver: TensorRT allocates the next engine outside cupy's pool."""
        self.context = self.engine = None
        self.cp.get_default_memory_pool().free_all_blocks()

    def __call__(self, **inputs):
        env = self.spec.bind(inputs)
        check_profile(self.record, self.name, env)
        ctx, cp = self.context, self.cp
        for t in self.spec.inputs:
            a = self.cp.ascontiguousarray(inputs[t.name])
            inputs[t.name] = a  # keep alive until the call returns
            ctx.set_input_shape(t.name, a.shape)
            ctx.set_tensor_address(t.name, a.data.ptr)
        outputs = {}
        for t in self.spec.outputs:
            outputs[t.name] = cp.empty(tuple(ctx.get_tensor_shape(t.name)), dtype=cp.float32)
            ctx.set_tensor_address(t.name, outputs[t.name].data.ptr)
        if not ctx.execute_async_v3(self.stream.ptr):
            raise RuntimeError(f"TensorRT failed to run the {self.name} engine")
        self.stream.synchronize()
        return check_finite(self.name, outputs, cp)


class TensorRTBackend:
    def __init__(self, root: Path, manifest: Manifest, precision: str = "fp32", on_demand: tuple[str, ...] = ()):
        engines = engines_of(manifest, precision, root)
        flavour = next(iter(engines.values()))["builder"]["flavour"]
        try:
            trt = importlib.import_module(MODULES[flavour])
            import cupy as cp
        except ImportError as exc:
            raise WanError(f"--backend tensorrt needs {exc.name} (pip install "
                           f"'wan-export[tensorrt]', with the {flavour} flavour the engines were built with)")
        try:
            gpu = "SM" + cp.cuda.Device().compute_capability  # cupy gives e.g. "86"
        except Exception as exc:  # cupy raises CUDARuntimeError without a driver or GPU
            raise WanError(f"--backend tensorrt needs an NVIDIA GPU ({str(exc).splitlines()[0]})")
        supported = ([c for c in dir(trt.ComputeCapability) if c.startswith("SM")]
                     if hasattr(trt, "ComputeCapability") else None)  # TensorRT-RTX only
        check_engines(engines, root, flavour, trt.__version__, gpu, supported)
        self.xp, self._cp, self._trt, self._root = cp, cp, trt, root
        self._manifest, self._engines = manifest, engines
        self.stream = cp.cuda.Stream(non_blocking=True)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        # One activation buffer for all stages: they run one after another, never together.
        # It grows when a stage opened later (--low-memory) needs more.
        self._activations, self._size, self._live = None, 0, {}
        self.stages = {name: OnDemandStage(manifest.stages[name].spec, lambda name=name: self._open(name))
                       if name in on_demand else self._open(name) for name in engines}
        log.debug("TensorRT %s: shared activation buffer %.1f MB", precision, self._size / 1e6)

    def _open(self, name: str) -> TensorRTStage:
        record, trt = self._engines[name], self._trt
        engine = self._runtime.deserialize_cuda_engine((self._root / record["path"]).read_bytes())
        if engine is None:
            raise WanError(f"TensorRT cannot load {record['path']} on this GPU; rebuild '{self._root}' "
                           "with wan-export --tensorrt")
        spec = self._manifest.stages[name].spec
        spec.check_graph(*engine_io(engine, trt), where=str(self._root / record["path"]))
        stage = TensorRTStage(name, spec, engine, record, self._cp, self.stream)
        stage.context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        self._live = {n: s for n, s in self._live.items() if s.context is not None}  # released ones drop out
        self._live[name] = stage
        if self._activations is None or engine.device_memory_size_v2 > self._size:
            self._size = max(engine.device_memory_size_v2, self._size, 1)
            self._activations = None  # freed before the larger one is taken
            self._activations = self._cp.cuda.alloc(self._size)
            for s in self._live.values():
                s.context.set_device_memory(self._activations.ptr, self._size)
        else:
            stage.context.set_device_memory(self._activations.ptr, self._size)
        return stage

    def to_device(self, a: np.ndarray):
        return self._cp.asarray(a)

    def to_host(self, a) -> np.ndarray:
        return self._cp.asnumpy(a)
