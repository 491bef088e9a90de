"""The single source of stage shapes: one `StageSpec` per exported graph.

Every axis is a `Dim`: a fixed size, or `scale * symbol + offset` over four symbols:

    B   batch (2x the user batch when classifier-free guidance runs as one call)
    F   latent frames                  video frames  T = 4*F - 3   (T = 4n + 1)
    Hp  token rows    = H / (8 * 2)    latent height = 2*Hp, video height = 16*Hp
    Wp  token columns = W / (8 * 2)    latent width  = 2*Wp, video width  = 16*Wp

(the numbers are the VAE's stride (4, 8, 8) and the DiT patch (1, 2, 2); they come from the
model's `Geometry`). From these specs come the ONNX dynamic axes and `torch.export` dims
(export/), engine profiles (engines/), sample inputs for validation, and the runtime's shape
checks, so a shape is written once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from runtime.errors import WanError

SYMBOLS = ("B", "F", "Hp", "Wp")


@dataclass(frozen=True)
class Dim:
    """One axis: `offset` alone when `symbol` is None, else `scale * symbol + offset`."""

    symbol: str | None = None
    scale: int = 1
    offset: int = 0

    @classmethod
    def fixed(cls, size: int) -> "Dim":
        return cls(None, 0, size)

    @classmethod
    def parse(cls, text: str) -> "Dim":
        """Inverse of `str()`: '3', 'F', '2*Hp', '4*F-3'."""
        m = re.fullmatch(r"(?:(\d+)\*)?([A-Za-z]\w*)([+-]\d+)?|(\d+)", text.replace(" ", ""))
        if not m:
            raise ValueError(f"cannot parse dimension {text!r}")
        if m.group(4) is not None:
            return cls.fixed(int(m.group(4)))
        return cls(m.group(2), int(m.group(1) or 1), int(m.group(3) or 0))

    def __str__(self) -> str:
        if self.symbol is None:
            return str(self.offset)
        text = self.symbol if self.scale == 1 else f"{self.scale}*{self.symbol}"
        return text + (f"{self.offset:+d}" if self.offset else "")

    def size(self, env: dict[str, int]) -> int:
        return self.offset if self.symbol is None else self.scale * env[self.symbol] + self.offset

    def solve(self, size: int) -> int | None:
        """The symbol value that gives `size`, or None when no integer value does."""
        if self.symbol is None:
            return None
        value, rest = divmod(size - self.offset, self.scale)
        return value if rest == 0 else None


@dataclass(frozen=True)
class TensorSpec:
    """A named graph input or output. `value_range` says what sample inputs should hold."""

    name: str
    dims: tuple[Dim, ...]
    dtype: str = "float32"
    value_range: tuple[float, float] | None = None  # None: standard normal samples

    def shape(self, env: dict[str, int]) -> tuple[int, ...]:
        return tuple(d.size(env) for d in self.dims)

    def to_dict(self) -> dict:
        out = {"name": self.name, "dims": [str(d) for d in self.dims], "dtype": self.dtype}
        if self.value_range is not None:
            out["value_range"] = list(self.value_range)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        vr = d.get("value_range")
        return cls(d["name"], tuple(Dim.parse(x) for x in d["dims"]), d["dtype"],
                   tuple(vr) if vr is not None else None)


@dataclass(frozen=True)
class StageSpec:
    """One exported graph: its named inputs and outputs, and `batch`, the most items the runtime
    sends it in one call (2 where CFG's two branches go together; a TensorRT profile's optimum)."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch: int = 1

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """ONNX-style dynamic axes: tensor name -> {axis: dimension expression}."""
        return {
            t.name: {i: str(d) for i, d in enumerate(t.dims) if d.symbol is not None}
            for t in self.inputs + self.outputs
        }

    def sample_inputs(self, env: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        out = {}
        for t in self.inputs:
            shape = t.shape(env)
            if t.value_range is None:
                x = rng.standard_normal(shape)
            else:
                x = rng.uniform(*t.value_range, size=shape)
            out[t.name] = x.astype(t.dtype)
        return out

    def bind(self, arrays: dict[str, np.ndarray]) -> dict[str, int]:
        """Check arrays against the inputs (names, dtypes, ranks, consistent symbols).

        Returns the symbol values. Raises ValueError: a mismatch here is a bug in the caller
        (the pipeline validates user requests before it builds arrays).
        """
        names = {t.name for t in self.inputs}
        if set(arrays) != names:
            raise ValueError(f"{self.name}: expected inputs {sorted(names)}, got {sorted(arrays)}")
        env: dict[str, int] = {}
        for t in self.inputs:
            a = arrays[t.name]
            if a.dtype != np.dtype(t.dtype) or a.ndim != len(t.dims):
                raise ValueError(f"{self.name}.{t.name}: expected {t.dtype} with dims "
                                 f"{[str(d) for d in t.dims]}, got {a.dtype} {a.shape}")
            for axis, (d, n) in enumerate(zip(t.dims, a.shape)):
                if d.symbol is None:
                    ok = n == d.offset
                else:
                    v = d.solve(n)
                    ok = v is not None and v >= 1 and env.setdefault(d.symbol, v) == v
                if not ok:
                    raise ValueError(f"{self.name}.{t.name}: axis {axis} is {n}, which does not "
                                     f"fit {d} (shape {a.shape}, symbols so far {env})")
        return env

    def check_graph(self, inputs: list[tuple], outputs: list[tuple], where: str) -> None:
        """Refuse a graph (or engine) whose I/O is not this spec's, at load rather than at the
        first call: `inputs`/`outputs` list (name, dtype, shape), a shape entry an int for a
        fixed axis and anything else for a dynamic one. Extra outputs are allowed."""
        fix = f"; rebuild '{where}' with wan-export"
        have_in = {name for name, _, _ in inputs}
        if have_in != {t.name for t in self.inputs}:
            raise WanError(f"{where} is not the {self.name} stage: its inputs are {sorted(have_in)}, the "
                           f"manifest says {sorted(t.name for t in self.inputs)}{fix}")
        for kind, specs, got in (("input", self.inputs, inputs), ("output", self.outputs, outputs)):
            have = {name: (dtype, tuple(shape)) for name, dtype, shape in got}
            for t in specs:
                if t.name not in have:
                    raise WanError(f"{where} is not the {self.name} stage: it has no {kind} "
                                   f"'{t.name}'{fix}")
                dtype, shape = have[t.name]
                fixed = [isinstance(n, int) and n >= 0 for n in shape]
                ok = dtype == t.dtype and len(shape) == len(t.dims) and all(
                    (d.symbol is None) == f and (not f or n == d.offset)
                    for d, n, f in zip(t.dims, shape, fixed))
                if not ok:
                    shown = [n if f else "?" for n, f in zip(shape, fixed)]
                    raise WanError(f"{where} is not the {self.name} stage: {kind} '{t.name}' is "
                                   f"{dtype} {shown}, the manifest says {t.dtype} "
                                   f"{[str(d) for d in t.dims]}{fix}")

    def to_dict(self) -> dict:
        return {"inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs], "batch": self.batch}

    @classmethod
    def from_dict(cls, name: str, d: dict) -> "StageSpec":
        return cls(name, tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
                   tuple(TensorSpec.from_dict(t) for t in d["outputs"]), d.get("batch", 1))


@dataclass(frozen=True)
class Geometry:
    """How video, latent and token grids relate; everything the specs need from a model."""

    latent_channels: int
    temporal_stride: int = 4  # VAE: T = stride * (F - 1) + 1
    spatial_stride: int = 8  # VAE: H = stride * latent height
    patch: tuple[int, int] = (2, 2)  # DiT spatial patch (the temporal patch is 1)

    @property
    def pixels_per_token(self) -> tuple[int, int]:
        return (self.spatial_stride * self.patch[0], self.spatial_stride * self.patch[1])

    def frames_to_latent(self, frames: int) -> int | None:
        """Latent frames for `frames` video frames, or None when frames is not stride*n + 1."""
        n, rest = divmod(frames - 1, self.temporal_stride)
        return n + 1 if rest == 0 and n >= 0 else None

    def env(self, batch: int, frames: int, height: int, width: int) -> dict[str, int]:
        """Symbol values for a video of this size (assumes the size was validated)."""
        ph, pw = self.pixels_per_token
        return {"B": batch, "F": self.frames_to_latent(frames), "Hp": height // ph, "Wp": width // pw}

    def to_dict(self) -> dict:
        return {"latent_channels": self.latent_channels, "temporal_stride": self.temporal_stride,
                "spatial_stride": self.spatial_stride, "patch": list(self.patch)}

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(d["latent_channels"], d["temporal_stride"], d["spatial_stride"],
                   tuple(d["patch"]))


@dataclass(frozen=True)
class SymbolRange:
    """Supported values of one symbol: the export's dynamic range and its typical value."""

    min: int
    opt: int
    max: int

    def to_list(self) -> list[int]:
        return [self.min, self.opt, self.max]


STAGE_NAMES = ("vae_encoder", "dit", "vae_decoder")
# `--text-kv` builds: the reference's cross-attention keys and values, once per video.
CONTEXT_STAGE = "dit_context"
# The streaming decoder: the chunk holding latent frame 0 (1 video frame), then one latent
# frame per call (4 video frames), with the causal convs' time context passed as tensors.
STREAM_STAGE_NAMES = ("vae_decoder_first", "vae_decoder_step")


def stage_specs(geom: Geometry, text_kv: tuple[int, int] | None = None) -> dict[str, StageSpec]:
    """The three stages' I/O, derived from the model geometry. `text_kv` (the DiT's layers and
    dim) adds the context stage, and the step takes its keys and values in place of the
    reference latent and the motion."""
    ph, pw = geom.patch
    sh, sw = geom.pixels_per_token
    ts = geom.temporal_stride
    B, C = Dim("B"), Dim.fixed(geom.latent_channels)
    video = (B, Dim.fixed(3), Dim("F", ts, 1 - ts), Dim("Hp", sh), Dim("Wp", sw))
    latent = (B, C, Dim("F"), Dim("Hp", ph), Dim("Wp", pw))
    unit = (-1.0, 1.0)
    reference = (
        TensorSpec("ref_latent", (B, C, Dim.fixed(1), Dim("Hp", ph), Dim("Wp", pw))),
        # Per latent frame, the affine map of the token grid that carries the reference's
        # content there (runtime/motion.py); identity maps: it stays where it is.
        TensorSpec("motion", (B, Dim("F"), Dim.fixed(2), Dim.fixed(3))),
    )
    specs = {
        "vae_encoder": StageSpec(
            "vae_encoder",
            inputs=(TensorSpec("video", video, value_range=unit),),
            outputs=(TensorSpec("latent", latent),),
        ),
        "dit": StageSpec(
            "dit",
            inputs=(TensorSpec("latent", latent), TensorSpec("timestep", (B,), value_range=(0.0, 1000.0)),
                    *reference),
            outputs=(TensorSpec("velocity", latent),),
            batch=2,  # CFG's two branches in one call
        ),
        "vae_decoder": StageSpec(
            "vae_decoder",
            inputs=(TensorSpec("latent", latent),),
            outputs=(TensorSpec("video", video, value_range=unit),),
        ),
    }
    if text_kv is None:
        return specs
    layers, dim = text_kv
    # k then v of each block, per latent frame and reference token (export/dit.py reference_kv)
    ref_kv = TensorSpec("ref_kv", (B, Dim.fixed(2 * layers), Dim("F"), Dim("Hp"), Dim("Wp"), Dim.fixed(dim)))
    step = specs["dit"]
    return {"vae_encoder": specs["vae_encoder"],
            CONTEXT_STAGE: StageSpec(CONTEXT_STAGE, reference, (ref_kv,), batch=step.batch),
            "dit": StageSpec("dit", (*step.inputs[:2], ref_kv), step.outputs, batch=step.batch),
            "vae_decoder": specs["vae_decoder"]}


def _caches(cache_layout: list[tuple[int, int, int]]) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Cache inputs and their next values, from (channels, frames, spatial scale) each: shape
    (B, channels, frames, scale*Hp, scale*Wp)."""
    caches = tuple(TensorSpec(f"cache_{i}", (Dim("B"), Dim.fixed(c), Dim.fixed(f), Dim("Hp", k), Dim("Wp", k)))
                   for i, (c, f, k) in enumerate(cache_layout))
    return caches, tuple(TensorSpec(f"new_cache_{i}", t.dims) for i, t in enumerate(caches))


def _stream_io(geom: Geometry):
    """A latent frame (B, C, 1, h, w) and a chunk of `n` video frames (B, 3, n, H, W)."""
    ph, pw = geom.patch
    sh, sw = geom.pixels_per_token
    B = Dim("B")
    latent = TensorSpec("latent", (B, Dim.fixed(geom.latent_channels), Dim.fixed(1), Dim("Hp", ph), Dim("Wp", pw)))

    def video(frames: int) -> TensorSpec:
        return TensorSpec("video", (B, Dim.fixed(3), Dim.fixed(frames), Dim("Hp", sh), Dim("Wp", sw)),
                          value_range=(-1.0, 1.0))

    return latent, video


def stream_decoder_specs(geom: Geometry, cache_layout: list[tuple[int, int, int]]) -> dict[str, StageSpec]:
    """Specs of the streaming decoder: latent frame 0 -> video frame 0, then one latent frame
    (+ caches) -> `temporal_stride` video frames. `cache_layout`: see `_caches`."""
    latent, video = _stream_io(geom)
    caches, new_caches = _caches(cache_layout)
    return {
        "vae_decoder_first": StageSpec("vae_decoder_first", (latent,), (video(1), *new_caches)),
        "vae_decoder_step": StageSpec("vae_decoder_step", (latent, *caches),
                                      (video(geom.temporal_stride), *new_caches)),
    }


def stream_encoder_specs(geom: Geometry, cache_layout: list[tuple[int, int, int]]) -> dict[str, StageSpec]:
    """The streaming encoder, the decoder's mirror: video frame 0 -> latent frame 0, then
    `temporal_stride` video frames (+ caches) -> one latent frame."""
    latent, video = _stream_io(geom)
    caches, new_caches = _caches(cache_layout)
    return {
        "vae_encoder_first": StageSpec("vae_encoder_first", (video(1),), (latent, *new_caches)),
        "vae_encoder_step": StageSpec("vae_encoder_step", (video(geom.temporal_stride), *caches),
                                      (latent, *new_caches)),
    }
