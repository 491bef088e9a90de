"""The wan family (released Wan 2.1 / 2.2 checkpoints): text (and TI2V's image) to video, as
diffusers' `WanPipeline` and `WanImageToVideoPipeline` compute it.

    pipe = Pipeline.from_dir("artifacts/wan")             # a WanPipeline
    pipe.generate(prompt="...", negative_prompt=None, image=None, frames=..., seed=0, noise=None)

Per video: the prompt and the negative prompt (diffusers' default "": an empty prompt) are
tokenized (runtime/text.py) and encoded as one batch of 2; TI2V's image is resized as diffusers'
VaeImageProcessor does (Lanczos, to the exact size) and encoded to latent frame 0. Per step, the
DiT gets the latent (TI2V with an image: frame 0 replaced by the image's latent, through the
pipeline's own mask arithmetic), the timestep (per token for TI2V: 0 on the image's tokens) and
the text embeddings, the conditional and negative branches as one batch-2 call; the scheduler
the checkpoint names (runtime/schedulers.py) takes the step. CFG runs when guidance > 1, as in
diffusers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from runtime.errors import WanError
from runtime.manifest import listed_file
from runtime.pipeline import Generation, Pipeline, Timings
from runtime.request import MAX_GUIDANCE, MAX_SEED, MAX_STEPS, SHIFT_RANGE, real, whole
from runtime.schedulers import from_config, with_override
from runtime.solvers import guided
from runtime.text import PromptTokenizer

MAX_PROMPT_CHARS = 20_000  # the tokenizer keeps 512 tokens; a longer prompt is a mistake


@dataclass(frozen=True)
class WanRequest:
    prompt: str
    negative_prompt: str
    frames: int
    height: int
    width: int
    steps: int
    guidance: float
    shift: float
    seed: int
    has_image: bool
    scheduler: str | None = None  # None: the checkpoint's; "unipc" or "euler" to swap it

    @property
    def cfg(self) -> bool:
        return self.guidance > 1.0  # diffusers' do_classifier_free_guidance


class WanPipeline(Pipeline):
    def __init__(self, root: Path, manifest, backend):
        super().__init__(root, manifest, backend)
        cfg = manifest.family_config
        try:
            text = cfg["text"]
            self.scheduler = from_config(cfg["scheduler"])
            self.per_token_timestep = bool(cfg["expand_timesteps"])
            self.takes_image = bool(cfg["takes_image"])
            tokenizer_file = listed_file(root, manifest, text["tokenizer"], "tokenizer")
            self.tokenizer = PromptTokenizer.from_file(tokenizer_file, int(text["max_length"]), text["pad_token"])
        except (KeyError, TypeError, ValueError) as exc:
            raise WanError(f"'{root}' has a malformed family_config ({type(exc).__name__}: {exc}); rebuild "
                           "with wan-export") from None
        if self.takes_image and "vae_encoder" not in self.stages:
            raise WanError(f"'{root}' takes an image but has no vae_encoder stage; rebuild with wan-export")

    # -- validation -----------------------------------------------------------------------

    def check_request(self, prompt=None, negative_prompt=None, image=None, frames=None, height=None,
                      width=None, steps=None, guidance=None, shift=None, seed=0, scheduler=None) -> WanRequest:
        """Fill defaults from the manifest and check every value; `image` only says whether one
        is given (it is read after the check)."""
        sampler = self.manifest.sampler
        for name, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
            if text is not None and not isinstance(text, str):
                raise WanError(f"{name} {text!r} is not allowed: use a string")
            if text is not None and len(text) > MAX_PROMPT_CHARS:
                raise WanError(f"{name} has {len(text):,} characters: use at most {MAX_PROMPT_CHARS:,} (the "
                               f"text encoder keeps {self.tokenizer.max_length} tokens)")
        if prompt is None:
            raise WanError("this model generates from a text prompt: give --prompt (prompt= in the API)")
        if image is not None and not self.takes_image:
            raise WanError("this model is text-to-video and takes no image: drop --image (TI2V-5B "
                           "checkpoints take one)")
        frames, height, width = self.check_video(frames, height, width)
        steps = whole("steps", sampler["steps"] if steps is None else steps, 1, MAX_STEPS)
        guidance = real("guidance", sampler["guidance"] if guidance is None else guidance, 0.0, MAX_GUIDANCE,
                        " (CFG runs above 1)")
        shift = real("shift", sampler["shift"] if shift is None else shift, *SHIFT_RANGE)
        seed = whole("seed", seed, 0, MAX_SEED)
        with_override(self.manifest.family_config["scheduler"], scheduler)  # refuses an unknown name
        negative = self.manifest.family_config.get("negative_prompt", "") if negative_prompt is None \
            else negative_prompt
        return WanRequest(prompt, negative, frames, height, width, steps, guidance, shift, seed,
                          image is not None, scheduler)

    # -- stages ---------------------------------------------------------------------------

    def encode_text(self, req: WanRequest):
        """Prompt (and negative prompt, with CFG) -> text embeddings (B, 512, D), on the backend."""
        prompts = [req.prompt, req.negative_prompt] if req.cfg else [req.prompt]
        ids, mask = self.tokenizer(prompts)
        to = self.backend.to_device
        return self.stages["text_encoder"](ids=to(ids), mask=to(mask))["text"]

    def load_image(self, image, req: WanRequest) -> np.ndarray:
        """A path or a uint8 (H, W, 3) array -> uint8 (height, width, 3), resized as diffusers
        resizes a pipeline's image (Lanczos to the exact size, aspect ratio not kept)."""
        from runtime.media import load_image, resize_exact

        if isinstance(image, (str, Path)):
            return load_image(image, req.height, req.width, fit="stretch")
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise WanError(f"image array has {getattr(image, 'dtype', type(image).__name__)} "
                           f"{getattr(image, 'shape', '')}; expected uint8 (H, W, 3)")
        return resize_exact(image, req.height, req.width)

    def encode_image(self, image: np.ndarray):
        """uint8 (H, W, 3) -> normalized latent frame (1, z, 1, h, w): pixels / 255 * 2 - 1, as
        diffusers' VaeImageProcessor normalizes."""
        x = image.astype(np.float32) / np.float32(255.0)
        x = 2.0 * x - 1.0
        x = np.ascontiguousarray(x.transpose(2, 0, 1)[None, :, None])  # (1, 3, 1, H, W)
        return self.stages["vae_encoder"](image=self.backend.to_device(x))["latent"]

    def noise(self, req: WanRequest):
        """The initial latent (1, z, F, h, w): the array diffusers' pipelines take as `latents=`."""
        return self.seeded_noise(req.seed, self.latent_shape(req.frames, req.height, req.width))

    def frame_mask(self, latent_shape, has_image: bool):
        """diffusers' first_frame_mask (1, 1, F, h, w): 0 where the image's latent stands."""
        xp = self.xp
        mask = xp.ones((1, 1, *latent_shape[2:]), dtype=xp.float32)
        if has_image:
            mask[:, :, 0] = 0
        return mask

    def denoise(self, text, image_latent, noise, req: WanRequest,
                on_step: Callable[[int, float], None] | None = None):
        """The pipeline's loop. `image_latent`: TI2V's frame 0 (or None); returns the latent
        with it in place."""
        xp, dit = self.xp, self.stages["dit"]
        scheduler = self.scheduler if req.scheduler is None else from_config(
            with_override(self.manifest.family_config["scheduler"], req.scheduler))
        schedule = scheduler.schedule(req.steps, req.shift)
        batch = text.shape[0]
        mask = self.frame_mask(noise.shape, image_latent is not None)
        token_mask = mask[0, 0][:, ::2, ::2]  # (F, Hp, Wp): the per-token timestep's 0s and 1s

        def model_input(x):
            return x if image_latent is None else (1 - mask) * image_latent + mask * x

        def velocity(x, i):
            t = schedule.timesteps[i]
            if self.per_token_timestep:
                timestep = xp.ascontiguousarray(xp.broadcast_to(token_mask * t, (batch, *token_mask.shape)))
            else:
                timestep = xp.full((batch,), t, dtype=xp.float32)
            latent = model_input(x)
            latent = latent if batch == 1 else xp.concatenate([latent] * batch)
            v = dit(latent=latent, timestep=timestep.astype(xp.float32), text=text)["velocity"]
            return v if batch == 1 else guided(v[:1], v[1:], req.guidance)

        latent = self.sample(noise, schedule, scheduler, velocity, None, on_step,
                             f"with guidance {req.guidance:g} and shift {req.shift:g}")
        return model_input(latent)

    # -- whole generation -------------------------------------------------------------------

    def generate(self, prompt=None, negative_prompt=None, image=None, frames=None, height=None, width=None,
                 steps=None, guidance=None, shift=None, seed=0, scheduler=None, noise=None,
                 on_step: Callable[[int, float], None] | None = None) -> Generation:
        """`image`: TI2V's first frame, a path or a uint8 (H, W, 3) array (resized to the video
        size). `scheduler`: "unipc" or "euler" instead of the checkpoint's. `noise`: the initial
        latent (1, z, F, h, w) float32, diffusers' `latents=`."""
        req = self.check_request(prompt, negative_prompt, image, frames, height, width, steps, guidance,
                                 shift, seed, scheduler)
        pixels = self.load_image(image, req) if image is not None else None
        if noise is not None:
            self.check_noise(noise, self.latent_shape(req.frames, req.height, req.width))
        timings = Timings(encode_label="encode (text, image)" if pixels is not None else "encode (text)")
        frames_out = np.concatenate(list(self.generate_chunks(req, timings, pixels, noise, on_step)))
        return Generation(frames_out, timings, req)

    def generate_chunks(self, req: WanRequest, timings: Timings, image: np.ndarray | None = None,
                        noise=None, on_step: Callable[[int, float], None] | None = None) -> Iterator[np.ndarray]:
        """Like `generate` for a checked request and a prepared image (uint8 at the video size),
        but yields uint8 frame chunks as the decoder makes them."""
        t_start = time.perf_counter()
        text = self.encode_text(req)
        image_latent = self.encode_image(image) if image is not None else None
        timings.encode = time.perf_counter() - t_start
        noise = self.noise(req) if noise is None else self.backend.to_device(noise)
        latent = self.denoise(text, image_latent, noise, req, self.recorder(timings, on_step))
        yield from self.frames_out(latent, timings, t_start)
