"""Model configuration: frozen dataclasses and the named presets.

A `ModelConfig` is passed whole to the modules that need it (nanoGPT style). It serializes to
the JSON stored in the manifest and read by `wan-export --config`.

Presets:
    tiny       tests: a few seconds per export, 9 frames at 64x64, seeded random weights
    small      the README demo: 17 frames at 128x128, 20 steps, trained weights bundled in
               export/pretrained/small.safetensors (python -m export.train makes them)
    wan2.2-5b  shapes of Wan2.2 TI2V-5B for analytic FLOP/memory projections only;
               building its modules is refused (it would need ~20 GB of fp32 weights)
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import WanError
from runtime.files import regular_file
from runtime.media import check_fps
from runtime.request import check_sampler
from runtime.stages import Geometry, SymbolRange

# Sanity caps on a config's sizes (Wan2.2-A14B is dim 5120, 40 layers): far beyond them is a typo,
# and even counting the parameters of such a model would take long.
MAX_WIDTH = 65536
MAX_LAYERS = 1024


@dataclass(frozen=True)
class VAEConfig:
    """Causal 3D VAE in the style of Wan 2.1 (stride 4x8x8 with the defaults)."""

    base_dim: int = 16
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)  # one level per entry; all but the last downsample
    num_res_blocks: int = 1  # per encoder level; the decoder has one more, like Wan
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # which downsamples halve time
    eps: float = 1e-6

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temporal_downsample)


@dataclass(frozen=True)
class DiTConfig:
    """Diffusion transformer (Wan naming). `attention`: "factorized" (the seed) or "full"."""

    dim: int = 256
    ffn_dim: int = 1024
    num_heads: int = 4
    num_layers: int = 4
    patch_size: tuple[int, int, int] = (1, 2, 2)
    freq_dim: int = 256  # sinusoidal timestep features
    attention: str = "factorized"
    rope_theta: float = 10000.0
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass(frozen=True)
class SamplerConfig:
    """Sampling defaults stored in the manifest; every one can be overridden by wan-run."""

    steps: int = 20
    shift: float = 5.0
    guidance: float = 5.0
    # Guidance rescale (runtime/solvers.py `rescale_frames`): 0 is plain classifier-free guidance
    guidance_rescale: float = 0.0
    solver: str = "dpm++2m"
    fps: int = 16


@dataclass(frozen=True)
class VideoConfig:
    """Default output size, and the largest size the exported graphs are declared for."""

    frames: int = 17
    height: int = 128
    width: int = 128
    max_frames: int = 129
    max_height: int = 1024
    max_width: int = 1024


@dataclass(frozen=True)
class ModelConfig:
    name: str = "small"
    vae: VAEConfig = field(default_factory=VAEConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    seed: int = 0  # seeded initialization when no checkpoint is given
    # Bundled trained weights (a .safetensors path relative to the export package), used when
    # no --checkpoint is given; None: seeded initialization.
    weights: str | None = None
    shape_only: bool = False  # analytic configs: never instantiate

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.vae.z_dim, self.vae.temporal_stride, self.vae.spatial_stride,
                        self.dit.patch_size[1:])

    def symbol_ranges(self) -> dict[str, SymbolRange]:
        """Dynamic ranges the graphs are exported for (the `opt` value is the default video)."""
        g, v = self.geometry, self.video
        ph, pw = g.pixels_per_token
        return {
            "B": SymbolRange(1, 2, 8),
            "F": SymbolRange(1, g.frames_to_latent(v.frames), g.frames_to_latent(v.max_frames)),
            "Hp": SymbolRange(1, v.height // ph, v.max_height // ph),
            "Wp": SymbolRange(1, v.width // pw, v.max_width // pw),
        }

    def validate(self) -> "ModelConfig":
        """Raise WanError for a config the model or the graphs cannot support: every range and
        divisibility the modules and the runtime rely on, so nothing fails halfway through a build
        (the memory a config needs is checked by export/weights.py, which can count parameters)."""
        v, d, g = self.vae, self.dit, self.geometry
        checks = [
            (1 <= v.base_dim <= MAX_WIDTH, f"vae.base_dim {v.base_dim} must be from 1 to {MAX_WIDTH}"),
            (1 <= v.z_dim <= 1024, f"vae.z_dim {v.z_dim} must be from 1 to 1024"),
            (2 <= len(v.dim_mult) <= 6 and all(1 <= m <= 64 for m in v.dim_mult),
             f"vae.dim_mult {list(v.dim_mult)} must list 2 to 6 multipliers from 1 to 64"),
            (1 <= v.num_res_blocks <= 16, f"vae.num_res_blocks {v.num_res_blocks} must be from 1 to 16"),
            (len(v.temporal_downsample) == len(v.dim_mult) - 1,
             f"vae.temporal_downsample needs {len(v.dim_mult) - 1} entries (one per downsample)"),
            (0 < v.eps < 1 and 0 < d.eps < 1, "vae.eps and dit.eps must be between 0 and 1"),
            (1 <= d.dim <= MAX_WIDTH, f"dit.dim {d.dim} must be from 1 to {MAX_WIDTH}"),
            (1 <= d.ffn_dim <= 4 * MAX_WIDTH, f"dit.ffn_dim {d.ffn_dim} must be from 1 to {4 * MAX_WIDTH}"),
            (1 <= d.num_heads <= d.dim, f"dit.num_heads {d.num_heads} must be from 1 to dit.dim"),
            (1 <= d.num_layers <= MAX_LAYERS, f"dit.num_layers {d.num_layers} must be from 1 to {MAX_LAYERS}"),
            (d.num_heads >= 1 and d.dim % d.num_heads == 0,
             f"dit.dim {d.dim} is not divisible by num_heads {d.num_heads}"),
            (d.num_heads >= 1 and d.head_dim % 2 == 0 and d.head_dim >= 6,
             f"dit head dim {d.head_dim if d.num_heads else '?'} must be even and >= 6 (3D RoPE splits it)"),
            (d.patch_size[0] == 1, f"dit.patch_size {list(d.patch_size)}: the temporal patch must be 1"),
            (all(1 <= p <= 8 for p in d.patch_size),
             f"dit.patch_size {list(d.patch_size)} entries must be from 1 to 8"),
            (2 <= d.freq_dim <= MAX_WIDTH and d.freq_dim % 2 == 0,
             f"dit.freq_dim {d.freq_dim} must be even, from 2 to {MAX_WIDTH}"),
            (d.rope_theta > 1 and math.isfinite(d.rope_theta), f"dit.rope_theta {d.rope_theta} must be > 1"),
            (d.attention in ("factorized", "full"),
             f"dit.attention {d.attention!r} must be 'factorized' or 'full'"),
            (self.seed >= 0, f"seed {self.seed} must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise WanError(f"config {self.name!r}: {message}")
        # The sampler defaults go through the runtime's own checks: an artifact must never
        # carry defaults that wan-run then refuses.
        s = self.sampler
        try:
            check_sampler(s.steps, s.guidance, s.guidance_rescale, s.shift, s.solver)
            check_fps(s.fps, "mp4")
        except WanError as exc:
            raise WanError(f"config {self.name!r}: sampler {exc}") from None
        ph, pw = g.pixels_per_token
        vid = self.video
        checks = []
        for name, size, mult in (("height", vid.height, ph), ("width", vid.width, pw),
                                 ("max_height", vid.max_height, ph), ("max_width", vid.max_width, pw)):
            checks.append((size % mult == 0 and size > 0,
                           f"video.{name} {size} must be a positive multiple of {mult}"))
        for name, frames in (("frames", vid.frames), ("max_frames", vid.max_frames)):
            checks.append((frames >= 1 and g.frames_to_latent(frames) is not None,
                           f"video.{name} {frames} must be {g.temporal_stride}n+1"))
        checks += [(vid.frames <= vid.max_frames and vid.height <= vid.max_height and vid.width <= vid.max_width,
                    "the default video must fit within video.max_frames/max_height/max_width")]
        for ok, message in checks:
            if not ok:
                raise WanError(f"config {self.name!r}: {message}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, data, "config").validate()


def _from_dict(cls, data: dict[str, Any], where: str):
    """Build a (nested) frozen dataclass; unknown keys and values of the wrong type are errors,
    missing keys take defaults."""
    if not isinstance(data, dict):
        raise WanError(f"{where} must be a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise WanError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _from_dict(hint, value, f"{where}.{key}")
        else:
            kwargs[key] = _typed(value, hint, f"{where}.{key}")
    return cls(**kwargs)


def _typed(value, hint, where: str):
    """`value` as the field type `hint` (int, float, str, bool, tuple[...], X | None), or a
    one-line WanError: a config is user input ("dim": "big" must not become a traceback)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _typed(value, next(a for a in args if a is not type(None)), where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise WanError(f"{where} must be a list, got {json.dumps(value)}")
        kinds = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(kinds) != len(value):
            raise WanError(f"{where} must have {len(kinds)} entries, got {json.dumps(value)}")
        return tuple(_typed(v, k, f"{where}[{i}]") for i, (v, k) in enumerate(zip(value, kinds)))
    names = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}
    ok = {int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
          str: isinstance(value, str), bool: isinstance(value, bool)}[hint]
    if not ok:
        raise WanError(f"{where} must be {names[hint]}, got {json.dumps(value)}")
    return float(value) if hint is float else value


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        name="tiny",
        vae=VAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2)),
        dit=DiTConfig(dim=48, ffn_dim=96, num_heads=2, num_layers=2, freq_dim=32),
        sampler=SamplerConfig(steps=4),
        video=VideoConfig(frames=9, height=64, width=64, max_frames=65, max_height=512, max_width=512),
    ),
    # Sized so that both models train from scratch in under 30 minutes on a 2-core CPU
    # (python -m export.train); the trained weights ship with the package.
    "small": ModelConfig(
        name="small",
        vae=VAEConfig(base_dim=8),
        dit=DiTConfig(dim=128, ffn_dim=512, num_heads=4, num_layers=4),
        # 16 held-out clips given their own motion, frames 1-16 (export/quality.py; colour
        # error / shape IoU / background error / track error). Rescaled 0.7: guidance 1.5:
        # 26.7 / 0.732 / 7.4 / 2.5 px, 2.0: 23.9 / 0.720 / 9.2 / 2.7 px, 3.0: 29.5 / 0.689 /
        # 12.0 / 3.2 px, 4.0: 35.5 / 0.658 / 13.0 / 3.7 px. Plain: 1.0 (no CFG): 41.9 / 0.738 /
        # 7.3 / 2.5 px, 1.5: 25.3 / 0.725 / 8.9 / 2.7 px, 2.0: 26.1 / 0.698 / 11.9 / 3.1 px
        # (README, "Guidance rescale" for why rescale helps the background)
        sampler=SamplerConfig(guidance=2.0, guidance_rescale=0.7),
        weights="pretrained/small.safetensors",
    ),
    # Wan2.2 TI2V-5B: dim 3072, 24 heads, 30 layers, ffn 14336; its VAE is 4x16x16 with z=48.
    "wan2.2-5b": ModelConfig(
        name="wan2.2-5b",
        vae=VAEConfig(base_dim=160, z_dim=48, dim_mult=(1, 2, 4, 4, 4),
                      temporal_downsample=(False, True, True, False)),
        dit=DiTConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, attention="full"),
        sampler=SamplerConfig(steps=50, guidance=5.0, fps=24),
        video=VideoConfig(frames=121, height=704, width=1280, max_frames=121, max_height=1280,
                          max_width=1280),
        shape_only=True,
    ),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise WanError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def load_config(path: str | Path) -> ModelConfig:
    """Read a config JSON: either a full config or {"preset": name, ...overrides}."""
    path = regular_file(path, "config file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WanError(f"config file '{path}' is not valid JSON: {exc}")
    if isinstance(data, dict) and "preset" in data:
        if not isinstance(data["preset"], str):
            raise WanError(f"config file '{path}': preset must be a preset name, got {data['preset']!r}")
        base = get_preset(data.pop("preset")).to_dict()
        data = _merge(base, data)
    return ModelConfig.from_dict(data)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out
