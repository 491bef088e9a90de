"""Generate a video from an artifact directory: encode the reference, denoise, decode.

Layered like a small inference API:
    Pipeline.from_dir(path)                          load + verify the artifacts once
    pipe.encode_reference(image) -> ref latent       one stage call
    pipe.motion_maps(image, req) -> maps, motion     where the subject goes (runtime/motion.py)
    pipe.denoise(ref, maps, noise, ...) -> latent    the flow-matching loop (one DiT call a step)
    pipe.decode(latent) -> uint8 frames
    pipe.generate(image, ...) -> Generation          all of it, with per-stage timings
    pipe(image, ...) -> uint8 frames (T, H, W, 3)    the same, frames only

User-facing arguments are validated up front (`check_request`) with one-line errors that name
the value and what is allowed, before any stage runs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from runtime.backends import open_backend
from runtime.errors import NonFiniteError, WanError
from runtime.manifest import Manifest, load_manifest
from runtime.motion import Motion, identity_maps, image_motion_maps
from runtime.request import MAX_SEED, Request, check_sampler, whole
from runtime.solvers import SOLVERS, flow_sigmas, guided, rescale_frames, timestep, with_reference_frame
from runtime.stages import STREAM_STAGE_NAMES


@dataclass
class Timings:
    """Wall-clock seconds per stage; `dit` holds one entry per denoising step."""

    encode: float = 0.0
    dit: list[float] = field(default_factory=list)
    decode: float = 0.0
    total: float = 0.0

    def table(self) -> str:
        per_step = sum(self.dit) / len(self.dit) if self.dit else 0.0
        rows = [("encode (reference)", self.encode),
                (f"DiT per step (x{len(self.dit)})", per_step),
                ("DiT all steps", sum(self.dit)),
                ("decode", self.decode),
                ("total", self.total)]
        return "\n".join(f"{name:<22}{sec * 1000:>10.1f} ms" for name, sec in rows)


@dataclass
class Generation:
    frames: np.ndarray  # uint8 (T, H, W, 3)
    timings: Timings
    request: Request
    motion: Motion  # the motion used (the request's, or the one drawn from its seed)


def to_unit(frames_uint8: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) -> float32 (1, 3, T, H, W) in [-1, 1]."""
    x = frames_uint8.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)[None])


def to_uint8(video: np.ndarray) -> np.ndarray:
    """float (1, 3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3)."""
    x = np.rint((np.clip(video[0], -1, 1).transpose(1, 2, 3, 0) + 1) * np.float32(127.5))
    return x.astype(np.uint8)


class Pipeline:
    """Arrays between stages live where the backend keeps them (`backend.xp`: numpy for ONNX
    Runtime, cupy on the GPU for TensorRT); only the image goes in and the video comes out."""

    def __init__(self, root: Path, manifest: Manifest, backend):
        self.root, self.manifest, self.backend = root, manifest, backend
        self.stages, self.xp = backend.stages, backend.xp

    @classmethod
    def from_dir(cls, path: str | Path, precision: str = "fp32", backend: str = "onnxruntime",
                 verify: str = "auto", threads: int | None = None,
                 expect_manifest: str | None = None) -> "Pipeline":
        """Load an artifact directory written by wan-export; `verify` and `expect_manifest` (the
        manifest's pinned sha256) as in `load_manifest`."""
        root = Path(path)
        manifest = load_manifest(root, verify, expect_manifest)
        return cls(root, manifest, open_backend(backend, root, manifest, precision, threads))

    # -- validation -----------------------------------------------------------------------

    def check_request(self, frames=None, height=None, width=None, steps=None, guidance=None,
                      shift=None, solver=None, seed=0, guidance_rescale=None,
                      motion: Motion | None = None) -> Request:
        """Fill defaults from the manifest and check every value against what the graphs allow
        (and `motion` against what the model was trained on)."""
        m, g = self.manifest, self.manifest.geometry
        video, sampler = m.video, m.sampler
        frames = video["frames"] if frames is None else frames
        height = video["height"] if height is None else height
        width = video["width"] if width is None else width
        steps = sampler["steps"] if steps is None else steps
        guidance = sampler["guidance"] if guidance is None else guidance
        if guidance_rescale is None:  # artifacts from before guidance rescale: plain CFG
            guidance_rescale = sampler.get("guidance_rescale", 0.0)
        shift = sampler["shift"] if shift is None else shift
        solver = sampler["solver"] if solver is None else solver

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
        height, width = sizes
        steps, guidance, guidance_rescale, shift, solver = check_sampler(
            steps, guidance, guidance_rescale, shift, solver)
        seed = whole("seed", seed, 0, MAX_SEED)
        if motion is not None:
            if not isinstance(motion, Motion):
                raise WanError(f"motion {motion!r} is not allowed: use runtime.Motion(...) or None")
            if not self.takes_motion:
                raise WanError("these artifacts' DiT has no motion input (exported before it existed): "
                               "re-export them to give a motion")
            motion.check()
        return Request(frames, height, width, steps, guidance, guidance_rescale, shift, solver, seed,
                       motion)

    # -- stages ---------------------------------------------------------------------------

    def encode_reference(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) -> normalized reference latent (1, C, 1, h, w), on the backend."""
        return self.stages["vae_encoder"](video=self.backend.to_device(to_unit(image[None])))["latent"]

    def noise(self, req: Request) -> np.ndarray:
        """The initial latent noise for a request: same seed, same noise, on every machine."""
        env = self.manifest.geometry.env(1, req.frames, req.height, req.width)
        shape = self.stages["dit"].spec.inputs[0].shape(env)
        noise = np.random.default_rng(req.seed).standard_normal(shape, dtype=np.float32)
        return self.backend.to_device(noise)  # drawn on the host: the same on every backend

    def check_noise(self, noise, req: Request) -> None:
        """A caller's initial latent: float32 of the request's latent shape, finite."""
        env = self.manifest.geometry.env(1, req.frames, req.height, req.width)
        shape = self.stages["dit"].spec.inputs[0].shape(env)
        if getattr(noise, "dtype", None) != np.float32 or tuple(noise.shape) != shape:
            raise WanError(f"noise has {getattr(noise, 'dtype', type(noise).__name__)} "
                           f"{tuple(getattr(noise, 'shape', ()))}; expected float32 {shape} for this request")
        if not np.isfinite(noise).all():
            raise NonFiniteError("noise holds NaN or Inf; nothing was generated")

    @property
    def takes_motion(self) -> bool:
        """False for artifacts exported before the DiT had a motion input."""
        return any(t.name == "motion" for t in self.stages["dit"].spec.inputs)

    def motion_maps(self, image: np.ndarray, req: Request) -> tuple[np.ndarray, Motion]:
        """The DiT's motion maps (F, 2, 3) for a reference image, and the motion they describe:
        the request's, or one drawn from its seed (runtime/motion.py)."""
        return image_motion_maps(image, req.motion, req.seed, req.frames, self.manifest.geometry)

    def dit_condition(self, ref_latent, maps, guidance: float) -> dict:
        """The DiT's condition inputs for every step, built once per video: `ref_latent` and
        `motion` (maps (F, 2, 3)). With guidance != 1 the conditional and null branches (all-zero
        reference latent, identity motion) run as one batch-2 call; each branch's latent frame 0
        is its reference too (`with_reference_frame`)."""
        xp = self.xp
        motion = self.backend.to_device(np.ascontiguousarray(maps[None]))  # (1, F, 2, 3)
        if guidance != 1.0:
            ref_latent = xp.concatenate([ref_latent, xp.zeros_like(ref_latent)])
            still = self.backend.to_device(identity_maps(maps.shape[0])[None])
            motion = xp.concatenate([motion, still])
        if not self.takes_motion:
            return {"ref_latent": ref_latent}
        return {"ref_latent": ref_latent, "motion": motion}

    def velocity(self, x, sigma: float, condition: dict, guidance: float, rescale: float = 0.0):
        """One DiT call; `condition` from `dit_condition`; `rescale`: see `solvers.rescale_frames`."""
        dit, xp = self.stages["dit"], self.xp
        ref = condition["ref_latent"]
        batch = ref.shape[0]
        t = xp.full((batch,), timestep(sigma), dtype=xp.float32)
        latent = x if batch == 1 else with_reference_frame(xp.concatenate([x] * batch), ref)
        v = dit(latent=latent, timestep=t, **condition)["velocity"]
        if batch == 1:
            return v
        v_guided = guided(v[:1], v[1:], guidance)
        return v_guided if rescale == 0.0 else rescale_frames(v_guided, v[:1], x, sigma, rescale)

    def denoise(self, ref_latent: np.ndarray, maps: np.ndarray, noise: np.ndarray, req: Request,
                on_step: Callable[[int, float], None] | None = None) -> np.ndarray:
        """Integrate the flow from noise (sigma 1) to a clean latent (sigma 0), with latent
        frame 0 the clean reference latent throughout (`with_reference_frame`); `maps` from
        `motion_maps`."""
        xp = self.xp
        if not bool(xp.isfinite(noise).all()):
            raise NonFiniteError("the initial latent (the noise) holds NaN or Inf; nothing was written")
        sigmas = flow_sigmas(req.steps, req.shift)
        condition = self.dit_condition(ref_latent, maps, req.guidance)  # constant across steps
        step, x, x0 = SOLVERS[req.solver], with_reference_frame(noise, ref_latent), None
        # Overflow in the guidance sum or a solver step is caught below as one line per run,
        # not as numpy's RuntimeWarning followed by a grey video.
        with np.errstate(over="ignore", invalid="ignore"):
            for i in range(req.steps):
                t0 = time.perf_counter()
                where = f"at step {i + 1} of {req.steps} (sigma {sigmas[i]:.4g})"
                try:
                    v = self.velocity(x, float(sigmas[i]), condition, req.guidance, req.guidance_rescale)
                except NonFiniteError as exc:
                    raise NonFiniteError(f"{exc} {where}; nothing was written") from None
                x, x0 = step(x, v, sigmas, i, x0)
                x = with_reference_frame(x, ref_latent)
                if not bool(xp.isfinite(x).all()):
                    raise NonFiniteError(f"the sampled latent became NaN or Inf {where}, with guidance "
                                         f"{req.guidance:g} and shift {req.shift:g}; nothing was written")
                if on_step is not None:
                    on_step(i, time.perf_counter() - t0)
        return x

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

    # -- whole generation -------------------------------------------------------------------

    def generate(self, image: np.ndarray | str | Path, frames=None, height=None, width=None,
                 steps=None, guidance=None, shift=None, solver=None, seed=0,
                 guidance_rescale=None, motion: Motion | None = None, noise: np.ndarray | None = None,
                 on_step: Callable[[int, float], None] | None = None) -> Generation:
        """image: uint8 (H, W, 3) at the requested size, or an image file (resized and
        centre-cropped to it). `motion`: where the subject goes (None: drawn from the seed;
        `Motion()`: it stays in place). `noise` overrides the seeded initial latent (for
        parity tests)."""
        req = self.check_request(frames, height, width, steps, guidance, shift, solver, seed,
                                 guidance_rescale, motion)
        if isinstance(image, (str, Path)):
            from runtime.media import load_image

            image = load_image(image, req.height, req.width)
        if image.dtype != np.uint8 or image.shape != (req.height, req.width, 3):
            raise WanError(f"reference image array has {image.dtype} {image.shape}; expected "
                           f"uint8 ({req.height}, {req.width}, 3)")
        if noise is not None:
            self.check_noise(noise, req)
        timings = Timings()
        maps, motion = self.motion_maps(image, req)
        frames_out = np.concatenate(list(self.generate_chunks(image, req, timings, noise, on_step, maps)))
        return Generation(frames_out, timings, req, motion)

    def generate_chunks(self, image: np.ndarray, req: Request, timings: Timings,
                        noise: np.ndarray | None = None,
                        on_step: Callable[[int, float], None] | None = None,
                        maps: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """Like `generate` for a checked request and a prepared image, but yields uint8 frame
        chunks (n, H, W, 3) as the decoder makes them, so a writer can consume them at once.
        `timings` is filled in as it goes (`total` once the last chunk is out). `maps`: from
        `motion_maps`, for a caller that already has them (found here otherwise)."""
        t_start = time.perf_counter()
        ref_latent = self.encode_reference(image)
        timings.encode = time.perf_counter() - t_start
        noise = self.noise(req) if noise is None else self.backend.to_device(noise)

        def record(i: int, seconds: float) -> None:
            timings.dit.append(seconds)
            if on_step is not None:
                on_step(i, seconds)

        maps = self.motion_maps(image, req)[0] if maps is None else maps
        latent = self.denoise(ref_latent, maps, noise, req, record)
        consumer = 0.0  # time spent outside this generator, by whoever takes the chunks
        chunks = self.decode_stream(latent) if self.can_stream else iter([self.decode_video(latent)])
        t0 = time.perf_counter()
        for chunk in chunks:
            frames = to_uint8(chunk)
            handed = time.perf_counter()
            yield frames
            consumer += time.perf_counter() - handed
        timings.decode = time.perf_counter() - t0 - consumer
        timings.total = time.perf_counter() - t_start - consumer

    def __call__(self, image, **kwargs) -> np.ndarray:
        """Generate and return uint8 frames (T, H, W, 3); see `generate` for the arguments."""
        return self.generate(image, **kwargs).frames
