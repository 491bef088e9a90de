"""TensorRT `.plan` engines from the stage graphs, through Polygraphy, strongly typed.

TensorRT 11 has no FP16/INT8 builder flags: precision comes from the graph (fp16 tensors, Q/DQ
nodes), so the same fp16 / int8 ONNX that ONNX Runtime runs is built as is. Works with the full
`tensorrt` package (datacenter, Jetson) or `tensorrt_rtx` (TensorRT for RTX), which builds real
engines on a machine without a GPU; `flavour="auto"` takes whichever is installed, full first.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import WanError
from runtime.stages import Geometry, StageSpec, SymbolRange

log = logging.getLogger(__name__)

FLAVOURS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}  # flavour -> module


@dataclass(frozen=True)
class VideoShape:
    frames: int
    height: int
    width: int

    @classmethod
    def parse(cls, text: str, what: str) -> "VideoShape":
        """'17x128x128' (frames x height x width)."""
        try:
            f, h, w = (int(x) for x in text.lower().split("x"))
        except ValueError:
            raise WanError(f"{what} {text!r} is not FRAMESxHEIGHTxWIDTH (e.g. 17x128x128)")
        return cls(f, h, w)

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


@dataclass(frozen=True)
class EngineOptions:
    """What `wan-export --tensorrt` builds; option names follow Polygraphy's where they exist."""

    min_shape: VideoShape
    opt_shape: VideoShape
    max_shape: VideoShape
    flavour: str = "auto"
    builder_optimization_level: int = 3
    compute_capabilities: tuple[str, ...] = ()  # TensorRT-RTX targets, e.g. ("SM86", "SM89")
    timing_cache: Path | None = None  # load from / save to, across builds
    extra: dict = field(default_factory=dict)


def resolve_flavour(flavour: str) -> str:
    if flavour == "auto":
        for name, module in FLAVOURS.items():
            if importlib.util.find_spec(module) is not None:
                return name
        raise WanError("--tensorrt needs TensorRT: pip install tensorrt (GPU machines) or "
                       "pip install tensorrt-rtx (builds without a GPU)")
    if flavour not in FLAVOURS:
        raise WanError(f"TensorRT flavour {flavour!r} is not one of auto, {', '.join(FLAVOURS)}")
    if importlib.util.find_spec(FLAVOURS[flavour]) is None:
        raise WanError(f"TensorRT flavour {flavour!r} is not installed (pip install {flavour})")
    return flavour


def _trt(flavour: str):
    """Import Polygraphy bound to the chosen TensorRT flavour."""
    os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = "1" if flavour == "tensorrt-rtx" else "0"
    from polygraphy import config as pconfig

    pconfig.USE_TENSORRT_RTX = flavour == "tensorrt-rtx"  # in case polygraphy was imported earlier
    import polygraphy.backend.trt as ptrt
    from polygraphy.logger import G_LOGGER

    # Without a GPU, TensorRT-RTX logs CUDA errors while it builds fine; a failed build raises
    # and is reported in one line. The builder's own log is for --debug.
    G_LOGGER.module_severity = G_LOGGER.VERBOSE if log.isEnabledFor(logging.DEBUG) else G_LOGGER.CRITICAL
    return ptrt, importlib.import_module(FLAVOURS[flavour])


def symbol_profile(opts: EngineOptions, geom: Geometry, batch: int,
                   exported: dict[str, SymbolRange]) -> dict[str, SymbolRange]:
    """Symbol ranges of one stage's engine from the user's video shapes, checked against the
    range the graph was exported for; the batch runs from 1 to the stage's `StageSpec.batch`."""
    shapes = (opts.min_shape, opts.opt_shape, opts.max_shape)
    envs = []
    for s, b in zip(shapes, (1, batch, batch)):
        if geom.frames_to_latent(s.frames) is None:
            raise WanError(f"engine shape {s}: frames {s.frames} must be {geom.temporal_stride}n+1")
        ph, pw = geom.pixels_per_token
        if s.height % ph or s.width % pw:
            raise WanError(f"engine shape {s}: height and width must be multiples of {ph}")
        envs.append(geom.env(b, s.frames, s.height, s.width))
    out = {}
    for sym in envs[0]:
        lo, opt, hi = (e[sym] for e in envs)
        if not lo <= opt <= hi:
            raise WanError(f"engine shapes need min <= opt <= max, got {' / '.join(map(str, shapes))}")
        r = exported[sym]
        if lo < r.min or hi > r.max:
            raise WanError(f"engine shapes {shapes[0]}..{shapes[2]} leave the range the graphs "
                           f"were exported for ({sym} {r.min}..{r.max})")
        out[sym] = SymbolRange(lo, opt, hi)
    return out


def build_engine(onnx_path: Path, plan_path: Path, spec: StageSpec, symbols: dict[str, SymbolRange],
                 opts: EngineOptions, timing_cache: Path) -> dict:
    """Build one strongly typed engine; returns what the manifest records about it."""
    flavour = resolve_flavour(opts.flavour)
    ptrt, trt = _trt(flavour)
    profile = ptrt.Profile()
    shapes = {}
    for t in spec.inputs:
        lo, opt, hi = ({s: getattr(r, k) for s, r in symbols.items()} for k in ("min", "opt", "max"))
        shapes[t.name] = [list(t.shape(lo)), list(t.shape(opt)), list(t.shape(hi))]
        profile.add(t.name, *shapes[t.name])
    network = ptrt.network_from_onnx_path(str(onnx_path), strongly_typed=True)
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    load_cache = str(timing_cache) if timing_cache.exists() else None
    config = ptrt.CreateConfig(profiles=[profile], builder_optimization_level=opts.builder_optimization_level,
                               load_timing_cache=load_cache)
    if opts.compute_capabilities:
        config = _with_compute_capabilities(config, trt, opts.compute_capabilities)
    t0 = time.perf_counter()
    try:
        engine = ptrt.engine_bytes_from_network(network, config=config, save_timing_cache=str(timing_cache))
    except Exception as exc:  # Polygraphy reports build failures as its own exception types
        raise WanError(f"TensorRT could not build {onnx_path.name}: {str(exc).splitlines()[0]}")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(engine))
    seconds = time.perf_counter() - t0
    log.info("    %s engine: %.1f MB in %.1f s", plan_path.name, plan_path.stat().st_size / 1e6, seconds)
    return {
        "size": plan_path.stat().st_size,
        "profile": shapes,
        "symbols": {s: r.to_list() for s, r in symbols.items()},
        "builder": {"flavour": flavour, "version": trt.__version__,
                    "optimization_level": opts.builder_optimization_level,
                    "strongly_typed": True},
        "compute_capabilities": list(opts.compute_capabilities) or ["builder default"],
        "build_seconds": round(seconds, 2),
    }


def _with_compute_capabilities(config, trt, targets: tuple[str, ...]):
    """Wrap a Polygraphy config loader so the builder targets the given compute capabilities."""
    if not hasattr(trt, "ComputeCapability"):
        raise WanError("--compute-capability is a TensorRT-RTX option; the full TensorRT package "
                       "builds for the GPU it runs on")
    valid = [c for c in dir(trt.ComputeCapability) if c.startswith("SM")]
    for c in targets:
        if c not in valid:
            raise WanError(f"compute capability {c!r} is not one of {', '.join(valid)}")

    def loader(builder, network):
        cfg = config(builder, network)
        cfg.num_compute_capabilities = len(targets)
        for i, c in enumerate(targets):
            cfg.set_compute_capability(getattr(trt.ComputeCapability, c), i)
        return cfg

    return loader
