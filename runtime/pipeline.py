"""Generate a video from an artifact directory: what every model family shares.

    Pipeline.from_dir(path)          load + verify the artifacts once; the manifest's `family`
                                     picks the pipeline class (runtime/seed.py, runtime/wan.py)
    pipe.generate(...) -> Generation all of it, with per-stage timings (arguments per family)
    pipe(...) -> uint8 frames        the same, frames only

The family classes condition the DiT; this one holds what they share: the one denoising loop
(`sample`: a scheduler step per DiT call, NaN/Inf caught per step), the seeded initial noise, the
video size checks, streaming decode and the timings. Arrays between stages live where the
backend keeps them (`backend.xp`: numpy for ONNX Runtime, cupy on the GPU for TensorRT).
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from runtime.backends import open_backend
from runtime.cache import StepCache
from runtime.errors import NonFiniteError, WanError, raise_if_terminated
from runtime.manifest import Manifest, load_manifest
from runtime.request import whole
from runtime.stages import STREAM_STAGE_NAMES

FAMILIES = {"seed": "runtime.seed:SeedPipeline", "wan": "runtime.wan:WanPipeline"}


def family_class(manifest: Manifest) -> type:
    module, name = FAMILIES[manifest.family].split(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class Timings:
    """Wall-clock seconds per stage; `dit` holds one entry per denoising step, `experts` (A14B)
    the stage that ran each step."""

    encode: float = 0.0
    dit: list[float] = field(default_factory=list)
    decode: float = 0.0
    total: float = 0.0
    encode_label: str = "encode (reference)"
    experts: list[str] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)  # --cache: the steps that reused a velocity

    @property
    def dit_calls(self) -> int:
        """DiT calls made (a step the cache served made none)."""
        return len(self.dit) - len(self.reused)

    def table(self) -> str:
        def mean(xs):
            return sum(xs) / len(xs) if xs else 0.0

        rows = [(self.encode_label, self.encode), (f"DiT per step (x{len(self.dit)})", mean(self.dit))]
        names = list(dict.fromkeys(self.experts))  # in the order they ran
        if len(names) > 1:
            for name in names:
                steps = [s for s, e in zip(self.dit, self.experts) if e == name]
                rows.append((f"  {name} per step (x{len(steps)})", mean(steps)))
        rows += [("DiT all steps", sum(self.dit)), ("decode", self.decode), ("total", self.total)]
        lines = [f"{name:<26}{sec * 1000:>10.1f} ms" for name, sec in rows]
        if self.reused:
            lines.append(f"step cache: {self.dit_calls} DiT calls for {len(self.dit)} steps")
        return "\n".join(lines)


@dataclass
class Generation:
    frames: np.ndarray  # uint8 (T, H, W, 3)
    timings: Timings
    request: object  # the family's checked request
    motion: object = None  # seed: the motion used (the request's, or the one drawn from its seed)


def to_unit(frames_uint8: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) -> float32 (1, 3, T, H, W) in [-1, 1]."""
    x = frames_uint8.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)[None])


def to_uint8(video: np.ndarray) -> np.ndarray:
    """float (1, 3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3)."""
    x = np.rint((np.clip(video[0], -1, 1).transpose(1, 2, 3, 0) + 1) * np.float32(127.5))
    return x.astype(np.uint8)


class Pipeline:
    def __init__(self, root: Path, manifest: Manifest, backend):
        self.root, self.manifest, self.backend = root, manifest, backend
        self.stages, self.xp = backend.stages, backend.xp

    @classmethod
    def from_dir(cls, path: str | Path, precision: str = "fp32", backend: str = "onnxruntime",
                 verify: str = "auto", threads: int | None = None,
                 expect_manifest: str | None = None, low_memory: bool = False) -> "Pipeline":
        """Load an artifact directory written by wan-export; `verify` and `expect_manifest` (the
        manifest's pinned sha256) as in `load_manifest`. `low_memory`: hold only the stages in
        use (the family's `on_demand` ones open when needed and are released after)."""
        root = Path(path)
        manifest = load_manifest(root, verify, expect_manifest)
        family = family_class(manifest)
        on_demand = family.on_demand(manifest) if low_memory else ()
        if low_memory and not on_demand:
            raise WanError("--low-memory does not apply to these artifacts: every stage is used at every step")
        return family(root, manifest, open_backend(backend, root, manifest, precision, threads, on_demand))

    @staticmethod
    def for_manifest(root: Path, manifest: Manifest, backend) -> "Pipeline":
        """The pipeline class of the manifest's model family, over an opened backend."""
        return family_class(manifest)(root, manifest, backend)

    @staticmethod
    def on_demand(manifest: Manifest) -> tuple[str, ...]:
        """Stages that need not stay loaded for a whole generation (the family says which)."""
        return ()

    def release(self, *names: str) -> None:
        """Close the on-demand stages `names` (a no-op for stages that stay loaded)."""
        for name in names:
            release = getattr(self.stages.get(name), "release", None)
            if release is not None:
                release()

    # -- shared checks ----------------------------------------------------------------------

    def check_video(self, frames, height, width) -> tuple[int, int, int]:
        """Frames, height and width (None: the manifest's defaults) against what the graphs
        were exported for; one-line errors naming the value and what is allowed."""
        m, g = self.manifest, self.manifest.geometry
        video = m.video
        frames = video["frames"] if frames is None else frames
        height = video["height"] if height is None else height
        width = video["width"] if width is None else width
        ts = g.temporal_stride
        max_frames = ts * (m.symbols["F"].max - 1) + 1
        frames_rule = f"use {ts}n+1 frames (1, {ts + 1}, {2 * ts + 1}, ...) up to {max_frames}"
        frames = whole("frames", frames, 1, max_frames, frames_rule)
        if g.frames_to_latent(frames) is None:
            raise WanError(f"frames {frames} is not allowed: {frames_rule}")
        sizes = []
        for name, size, mult, sym in (("height", height, g.pixels_per_token[0], "Hp"),
                                      ("width", width, g.pixels_per_token[1], "Wp")):
            r = m.symbols[sym]
            rule = f"use a multiple of {mult} from {r.min * mult} to {r.max * mult}"
            sizes.append(whole(name, size, r.min * mult, r.max * mult, rule))
            if sizes[-1] % mult:
                raise WanError(f"{name} {size} is not allowed: {rule}")
        return frames, sizes[0], sizes[1]

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, ...]:
        env = self.manifest.geometry.env(1, frames, height, width)
        return self.stages["dit"].spec.outputs[0].shape(env)  # the velocity: the latent being sampled

    def seeded_noise(self, seed: int, shape: tuple[int, ...]):
        """The initial latent noise: same seed, same noise, on every machine and backend."""
        noise = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        return self.backend.to_device(noise)  # drawn on the host

    @staticmethod
    def check_noise(noise, shape: tuple[int, ...]) -> None:
        """A caller's initial latent: float32 of the request's latent shape, finite."""
        if getattr(noise, "dtype", None) != np.float32 or tuple(noise.shape) != shape:
            raise WanError(f"noise has {getattr(noise, 'dtype', type(noise).__name__)} "
                           f"{tuple(getattr(noise, 'shape', ()))}; expected float32 {shape} for this request")
        if not np.isfinite(noise).all():
            raise NonFiniteError("noise holds NaN or Inf; nothing was generated")

    # -- the denoising loop ---------------------------------------------------------------------

    def sample(self, x, schedule, scheduler, velocity: Callable, after_step: Callable | None = None,
               on_step: Callable[[int, float], None] | None = None, settings: str = ""):
        """Integrate the flow from `x` along `schedule`: one `velocity(x, i)` (the family's DiT
        call, with guidance) and one `scheduler.step` per step, `after_step(x)` after each.
        A NaN/Inf anywhere stops it with one line naming the stage or the sampler and the step."""
        xp = self.xp
        if not bool(xp.isfinite(x).all()):
            raise NonFiniteError("the initial latent (the noise) holds NaN or Inf; nothing was written")
        steps, state = len(schedule.timesteps), None
        # Overflow in the guidance sum or a solver step is caught below as one line per run,
        # not as numpy's RuntimeWarning followed by a grey video.
        with np.errstate(over="ignore", invalid="ignore"):
            for i in range(steps):
                raise_if_terminated()
                t0 = time.perf_counter()
                where = f"at step {i + 1} of {steps} (sigma {float(schedule.sigmas[i]):.4g})"
                try:
                    v = velocity(x, i)
                except NonFiniteError as exc:
                    raise NonFiniteError(f"{exc} {where}; nothing was written") from None
                x, state = scheduler.step(schedule, i, v, x, state)
                if after_step is not None:
                    x = after_step(x)
                if not bool(xp.isfinite(x).all()):
                    raise NonFiniteError(f"the sampled latent became NaN or Inf {where}, {settings}; "
                                         "nothing was written")
                if on_step is not None:
                    on_step(i, time.perf_counter() - t0)
        return x

    # -- decoding ---------------------------------------------------------------------------

    @property
    def can_stream(self) -> bool:
        return all(name in self.stages for name in STREAM_STAGE_NAMES)

    def decode_stream(self, latent) -> Iterator[np.ndarray]:
        """Decode frame by frame: yields float video chunks (1, 3, n, H, W) in [-1, 1] on the host,
        1 frame for latent frame 0, then 4 per latent frame. Memory stays that of one chunk."""
        first, step = self.stages["vae_decoder_first"], self.stages["vae_decoder_step"]
        out = first(latent=self.xp.ascontiguousarray(latent[:, :, :1]))
        for k in range(1, latent.shape[2] + 1):
            yield self.backend.to_host(out.pop("video"))
            if k == latent.shape[2]:
                break
            caches = {name.removeprefix("new_"): value for name, value in out.items()}
            out = step(latent=self.xp.ascontiguousarray(latent[:, :, k:k + 1]), **caches)

    def decode_video(self, latent, stream: bool | None = None) -> np.ndarray:
        """latent (1, C, F, h, w) -> float video (1, 3, T, H, W) in [-1, 1], on the host.
        Streams by default when the artifacts have the streaming decoder."""
        if stream is None:
            stream = self.can_stream
        if stream:
            return np.concatenate(list(self.decode_stream(latent)), axis=2)
        return self.backend.to_host(self.stages["vae_decoder"](latent=latent)["video"])

    def frames_out(self, latent, timings: Timings, t_start: float) -> Iterator[np.ndarray]:
        """uint8 frame chunks (n, H, W, 3) as the decoder makes them, filling in `timings`
        (decode, and total since `t_start`, without the time the consumer took)."""
        consumer = 0.0
        chunks = self.decode_stream(latent) if self.can_stream else iter([self.decode_video(latent)])
        t0 = time.perf_counter()
        for chunk in chunks:
            frames = to_uint8(chunk)
            handed = time.perf_counter()
            yield frames
            consumer += time.perf_counter() - handed
        timings.decode = time.perf_counter() - t0 - consumer
        timings.total = time.perf_counter() - t_start - consumer

    def cached(self, velocity: Callable, req, timings: Timings | None,
               group_of: Callable[[int], str] = lambda i: "dit") -> Callable:
        """`velocity` behind the request's step cache (--cache; runtime/cache.py), the steps it
        serves listed in `timings.reused`; `group_of(i)`: the expert of step i (its own state)."""
        if req.cache is None:
            return velocity
        cache = StepCache(req.cache, req.steps, self.xp)
        if timings is not None:
            timings.reused = cache.reused
        return cache.wrap(velocity, group_of)

    @staticmethod
    def recorder(timings: Timings, on_step: Callable[[int, float], None] | None) -> Callable[[int, float], None]:
        def record(i: int, seconds: float) -> None:
            timings.dit.append(seconds)
            if on_step is not None:
                on_step(i, seconds)

        return record

    def __call__(self, *args, **kwargs) -> np.ndarray:
        """Generate and return uint8 frames (T, H, W, 3); see the family's `generate`."""
        return self.generate(*args, **kwargs).frames
