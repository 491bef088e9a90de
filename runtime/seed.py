"""The seed family (this project's model): animate a reference image along a motion.

    pipe = Pipeline.from_dir("artifacts/small")           # a SeedPipeline
    pipe.encode_reference(image) -> ref latent             one stage call
    pipe.motion_maps(image, req) -> maps, motion           where the subject goes (runtime/motion.py)
    pipe.denoise(ref, maps, noise, req) -> latent          the flow-matching loop (one DiT call a step;
                                                           --text-kv builds: the dit_context stage
                                                           once, for the reference's K/V)
    pipe.decode_video(latent) -> float video
    pipe.generate(image, ...) -> Generation                all of it, with per-stage timings

The DiT is conditioned on the reference latent (cross-attention, and as latent frame 0 of every
step: `with_reference_frame`) and on the motion maps; CFG's null branch is an all-zero reference
latent with identity motion, run with the conditional one as a batch of 2. User arguments are
checked up front (`check_request`) with one-line errors.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from runtime.cache import parse_cache
from runtime.errors import WanError
from runtime.motion import Motion, identity_maps, image_motion_maps
from runtime.pipeline import Generation, Pipeline, Timings, to_unit
from runtime.request import MAX_SEED, Request, check_sampler, whole
from runtime.solvers import SeedSolver, guided, rescale_frames, timestep, with_reference_frame
from runtime.stages import CONTEXT_STAGE


class SeedPipeline(Pipeline):
    # -- validation -----------------------------------------------------------------------

    def check_request(self, frames=None, height=None, width=None, steps=None, guidance=None,
                      shift=None, solver=None, seed=0, guidance_rescale=None,
                      motion: Motion | None = None, cache=None) -> Request:
        """Fill defaults from the manifest and check every value against what the graphs allow
        (and `motion` against what the model was trained on)."""
        sampler = self.manifest.sampler
        frames, height, width = self.check_video(frames, height, width)
        steps = sampler["steps"] if steps is None else steps
        guidance = sampler["guidance"] if guidance is None else guidance
        if guidance_rescale is None:  # artifacts from before guidance rescale: plain CFG
            guidance_rescale = sampler.get("guidance_rescale", 0.0)
        shift = sampler["shift"] if shift is None else shift
        solver = sampler["solver"] if solver is None else solver
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
                       motion, parse_cache(cache))

    # -- stages ---------------------------------------------------------------------------

    def encode_reference(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) -> normalized reference latent (1, C, 1, h, w), on the backend."""
        return self.stages["vae_encoder"](video=self.backend.to_device(to_unit(image[None])))["latent"]

    def noise(self, req: Request) -> np.ndarray:
        """The initial latent noise for a request: same seed, same noise, on every machine."""
        return self.seeded_noise(req.seed, self.latent_shape(req.frames, req.height, req.width))

    @property
    def takes_motion(self) -> bool:
        """False for artifacts exported before the DiT had a motion input."""
        return any(t.name == "motion" for s in self.stages.values() for t in s.spec.inputs)

    def motion_maps(self, image: np.ndarray, req: Request) -> tuple[np.ndarray, Motion]:
        """The DiT's motion maps (F, 2, 3) for a reference image, and the motion they describe:
        the request's, or one drawn from its seed (runtime/motion.py)."""
        return image_motion_maps(image, req.motion, req.seed, req.frames, self.manifest.geometry)

    def dit_condition(self, ref_latent, maps, guidance: float) -> tuple:
        """What the DiT is conditioned on at every step, built once per video: the reference
        latent per branch (for `with_reference_frame`) and the DiT's condition inputs,
        `ref_latent` and `motion` (maps (F, 2, 3)), or in --text-kv builds the `ref_kv` the
        context stage makes of them. With guidance != 1 the conditional and null branches
        (all-zero reference latent, identity motion) run as one batch-2 call."""
        xp = self.xp
        motion = self.backend.to_device(np.ascontiguousarray(maps[None]))  # (1, F, 2, 3)
        if guidance != 1.0:
            ref_latent = xp.concatenate([ref_latent, xp.zeros_like(ref_latent)])
            still = self.backend.to_device(identity_maps(maps.shape[0])[None])
            motion = xp.concatenate([motion, still])
        inputs = {"ref_latent": ref_latent, "motion": motion} if self.takes_motion else {"ref_latent": ref_latent}
        if CONTEXT_STAGE in self.stages:
            inputs = self.stages[CONTEXT_STAGE](**inputs)  # {"ref_kv": (B, 2 * layers, F, H, W, D)}
        return ref_latent, inputs

    def velocity(self, x, sigma: float, condition: tuple, guidance: float, rescale: float = 0.0):
        """One DiT call; `condition` from `dit_condition`; `rescale`: see `solvers.rescale_frames`.
        Each branch's latent frame 0 is its reference (`with_reference_frame`)."""
        dit, xp = self.stages["dit"], self.xp
        ref, inputs = condition
        batch = ref.shape[0]
        t = xp.full((batch,), timestep(sigma), dtype=xp.float32)
        latent = x if batch == 1 else with_reference_frame(xp.concatenate([x] * batch), ref)
        v = dit(latent=latent, timestep=t, **inputs)["velocity"]
        if batch == 1:
            return v
        v_guided = guided(v[:1], v[1:], guidance)
        return v_guided if rescale == 0.0 else rescale_frames(v_guided, v[:1], x, sigma, rescale)

    def denoise(self, ref_latent: np.ndarray, maps: np.ndarray, noise: np.ndarray, req: Request,
                on_step: Callable[[int, float], None] | None = None,
                timings: Timings | None = None) -> np.ndarray:
        """Integrate the flow from noise (sigma 1) to a clean latent (sigma 0), with latent
        frame 0 the clean reference latent throughout (`with_reference_frame`); `maps` from
        `motion_maps`."""
        solver = SeedSolver(req.solver)
        schedule = solver.schedule(req.steps, req.shift)
        condition = self.dit_condition(ref_latent, maps, req.guidance)  # constant across steps

        def velocity(x, i):
            return self.velocity(x, float(schedule.sigmas[i]), condition, req.guidance, req.guidance_rescale)

        return self.sample(with_reference_frame(noise, ref_latent), schedule, solver,
                           self.cached(velocity, req, timings),
                           lambda x: with_reference_frame(x, ref_latent), on_step,
                           f"with guidance {req.guidance:g} and shift {req.shift:g}")

    # -- whole generation -------------------------------------------------------------------

    def generate(self, image: np.ndarray | str | Path, frames=None, height=None, width=None,
                 steps=None, guidance=None, shift=None, solver=None, seed=0,
                 guidance_rescale=None, motion: Motion | None = None, noise: np.ndarray | None = None,
                 on_step: Callable[[int, float], None] | None = None, cache: str | None = None) -> Generation:
        """image: uint8 (H, W, 3) at the requested size, or an image file (resized and
        centre-cropped to it). `motion`: where the subject goes (None: drawn from the seed;
        `Motion()`: it stays in place). `noise` overrides the seeded initial latent (for
        parity tests). `cache`: a step cache, e.g. "magcache:0.1" (runtime/cache.py)."""
        req = self.check_request(frames, height, width, steps, guidance, shift, solver, seed,
                                 guidance_rescale, motion, cache)
        if isinstance(image, (str, Path)):
            from runtime.media import load_image

            image = load_image(image, req.height, req.width)
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != (req.height, req.width, 3):
            raise WanError(f"reference image array has {getattr(image, 'dtype', type(image).__name__)} "
                           f"{getattr(image, 'shape', '')}; expected uint8 ({req.height}, {req.width}, 3)")
        if noise is not None:
            self.check_noise(noise, self.latent_shape(req.frames, req.height, req.width))
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
        maps = self.motion_maps(image, req)[0] if maps is None else maps
        latent = self.denoise(ref_latent, maps, noise, req, self.recorder(timings, on_step), timings)
        yield from self.frames_out(latent, timings, t_start)
