"""The wan family (released Wan 2.1 / 2.2 checkpoints): text (and an image) to video, as
diffusers' `WanPipeline` and `WanImageToVideoPipeline` compute it.

    pipe = Pipeline.from_dir("artifacts/wan")             # a WanPipeline
    pipe.generate(prompt="...", negative_prompt=None, image=None, last_image=None, frames=...,
                  guidance=None, guidance_2=None, seed=0, noise=None)

Per video: the prompt and the negative prompt (diffusers' default "": an empty prompt) are
tokenized (runtime/text.py) and encoded as one batch of 2. The image conditions the DiT as the
manifest's `condition` says:
    first_frame (TI2V-5B)  resized as diffusers' VaeImageProcessor does (Lanczos, exact size) and
                           encoded to latent frame 0, which replaces the sample's frame 0 through
                           the pipeline's mask arithmetic; its tokens get timestep 0
    latents (I2V)          the image followed by zero frames (and the last image, if given) is
                           VAE-encoded chunk by chunk; with the pipeline's frame mask it is the
                           `condition` the DiT concatenates on channels; Wan2.1 I2V also gives CLIP
                           embeddings of the image as the user passed it (runtime/clip.py)
Per step, the DiT gets the latent, the timestep and the text (and the image's) embeddings, the
conditional and negative branches as one batch-2 call; the scheduler the checkpoint names
(runtime/schedulers.py) takes the step. CFG runs when guidance > 1, as in diffusers. A14B has two
DiTs: `dit` for timesteps >= boundary_ratio * num_train_timesteps (high noise) with `guidance`,
`dit_2` after it with `guidance_2`, switched where diffusers switches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from runtime.cache import parse_cache
from runtime.clip import clip_pixels
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
    guidance_2: float | None = None  # A14B: the low-noise expert's guidance
    has_last_image: bool = False
    cache: object | None = None  # runtime.cache.CacheSetting; None: every step runs the DiT

    @property
    def cfg(self) -> bool:
        return self.guidance > 1.0  # diffusers' do_classifier_free_guidance


CONDITIONS = ("text", "first_frame", "latents")
EXPERTS = ("dit", "dit_2")


class WanPipeline(Pipeline):
    def __init__(self, root: Path, manifest, backend):
        super().__init__(root, manifest, backend)
        cfg = manifest.family_config
        try:
            text = cfg["text"]
            self.scheduler = from_config(cfg["scheduler"])
            self.per_token_timestep = bool(cfg["expand_timesteps"])
            # manifests from before image-to-video name no condition: TI2V or text-to-video
            self.condition = cfg.get("condition", "first_frame" if cfg["takes_image"] else "text")
            self.takes_image = bool(cfg["takes_image"])
            self.needs_image = bool(cfg.get("needs_image", False))
            self.takes_last_image = bool(cfg.get("takes_last_image", False))
            self.boundary_ratio = cfg.get("boundary_ratio")
            self.clip = cfg.get("clip")
            tokenizer_file = listed_file(root, manifest, text["tokenizer"], "tokenizer")
            self.tokenizer = PromptTokenizer.from_file(tokenizer_file, int(text["max_length"]), text["pad_token"])
            if self.condition not in CONDITIONS:
                raise ValueError(f"condition {self.condition!r}")
        except (KeyError, TypeError, ValueError) as exc:
            raise WanError(f"'{root}' has a malformed family_config ({type(exc).__name__}: {exc}); rebuild "
                           "with wan-export") from None
        needed = {"first_frame": ["vae_encoder"], "latents": ["vae_encoder_first", "vae_encoder_step"],
                  "text": []}[self.condition]
        needed += ["dit_2"] if self.boundary_ratio is not None else []
        needed += ["image_encoder"] if self.clip is not None else []
        # --text-kv builds: each expert's K/V come from its context stage, once per video
        self.text_kv = bool(cfg.get("text_kv", False))
        needed += [f"{e}_context" for e in self.experts] if self.text_kv else []
        missing = [n for n in needed if n not in self.stages]
        if missing:
            raise WanError(f"'{root}' has no {missing[0]} stage, which this model needs; rebuild with wan-export")

    @staticmethod
    def on_demand(manifest) -> tuple[str, ...]:
        """--low-memory: the encoders run once per video and each A14B expert for its steps."""
        once = ("text_encoder", "image_encoder", "vae_encoder", "vae_encoder_first", "vae_encoder_step",
                *(f"{e}_context" for e in EXPERTS))
        return tuple(n for n in (*once, *EXPERTS) if n in manifest.stages)

    @property
    def experts(self) -> tuple[str, ...]:
        return EXPERTS if self.boundary_ratio is not None else EXPERTS[:1]

    # -- validation -----------------------------------------------------------------------

    def check_request(self, prompt=None, negative_prompt=None, image=None, frames=None, height=None,
                      width=None, steps=None, guidance=None, shift=None, seed=0, scheduler=None,
                      guidance_2=None, last_image=None, cache=None) -> WanRequest:
        """Fill defaults from the manifest and check every value; `image` and `last_image` only
        say whether one is given (they are read after the check)."""
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
            raise WanError("this model is text-to-video and takes no image: drop --image (image-to-video and "
                           "TI2V-5B checkpoints take one)")
        if image is None and self.needs_image:
            raise WanError("this model is image-to-video: give --image (image= in the API), the first frame")
        if last_image is not None and not self.takes_last_image:
            raise WanError("this model takes no last image: drop --last-image (Wan2.2 I2V-A14B takes one)")
        if last_image is not None and image is None:
            raise WanError("--last-image needs --image: the video goes from the first image to the last")
        if guidance_2 is not None and len(self.experts) == 1:
            raise WanError("--guidance-2 is the low-noise expert's guidance; this model has one transformer "
                           "(Wan2.2 A14B has two)")
        frames, height, width = self.check_video(frames, height, width)
        if last_image is not None and frames < 2:
            raise WanError(f"frames {frames} is not allowed with a last image: use at least "
                           f"{self.manifest.geometry.temporal_stride + 1}")
        steps = whole("steps", sampler["steps"] if steps is None else steps, 1, MAX_STEPS)
        guidance = real("guidance", sampler["guidance"] if guidance is None else guidance, 0.0, MAX_GUIDANCE,
                        " (CFG runs above 1)")
        if len(self.experts) == 2:
            # the release's own (in the manifest), else this request's guidance, as diffusers does
            guidance_2 = sampler.get("guidance_2", guidance) if guidance_2 is None else guidance_2
            guidance_2 = real("guidance 2", guidance_2, 0.0, MAX_GUIDANCE, " (the low-noise expert's)")
        shift = real("shift", sampler["shift"] if shift is None else shift, *SHIFT_RANGE)
        seed = whole("seed", seed, 0, MAX_SEED)
        with_override(self.manifest.family_config["scheduler"], scheduler)  # refuses an unknown name
        negative = self.manifest.family_config.get("negative_prompt", "") if negative_prompt is None \
            else negative_prompt
        return WanRequest(prompt, negative, frames, height, width, steps, guidance, shift, seed,
                          image is not None, scheduler, guidance_2, last_image is not None, parse_cache(cache))

    # -- stages ---------------------------------------------------------------------------

    def encode_text(self, req: WanRequest):
        """Prompt (and negative prompt, with CFG) -> text embeddings (B, 512, D), on the backend."""
        prompts = [req.prompt, req.negative_prompt] if req.cfg else [req.prompt]
        ids, mask = self.tokenizer(prompts)
        to = self.backend.to_device
        text = self.stages["text_encoder"](ids=to(ids), mask=to(mask))["text"]
        self.release("text_encoder")
        return text

    @staticmethod
    def load_image(image, what: str = "image") -> np.ndarray:
        """A path (or a `SentFile`) or a uint8 (H, W, 3) array -> uint8 (H, W, 3) as given: the stages resize it
        as the pipeline does (to the video size for the VAE, CLIP's own way for CLIP)."""
        from runtime.media import SentFile, load_image

        if isinstance(image, (str, Path, SentFile)):
            return load_image(image, fit="none", what=what)
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 \
                or min(image.shape[:2]) < 1:
            raise WanError(f"{what} array has {getattr(image, 'dtype', type(image).__name__)} "
                           f"{getattr(image, 'shape', '')}; expected uint8 (H, W, 3)")
        return image

    def vae_input(self, image: np.ndarray, req: WanRequest) -> np.ndarray:
        """uint8 (H, W, 3) -> float32 (1, 3, 1, height, width) in [-1, 1]: resized as diffusers'
        VaeImageProcessor does (Lanczos to the exact size), pixels / 255 * 2 - 1 (diffusers'
        arithmetic, not runtime.pipeline.to_unit's / 127.5 - 1, which rounds differently)."""
        from runtime.media import resize_exact

        x = resize_exact(image, req.height, req.width).astype(np.float32) / np.float32(255.0)
        x = 2.0 * x - 1.0
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None, :, None])  # (1, 3, 1, H, W)

    def encode_image(self, image: np.ndarray, req: WanRequest):
        """TI2V: uint8 (H, W, 3) -> normalized latent frame (1, z, 1, h, w)."""
        latent = self.stages["vae_encoder"](image=self.backend.to_device(self.vae_input(image, req)))["latent"]
        self.release("vae_encoder")
        return latent

    def encode_condition(self, image: np.ndarray, last: np.ndarray | None, req: WanRequest):
        """I2V: the pipeline's `condition` (1, 4 + z, F, h, w): its frame mask, then the VAE
        encoding of the image followed by zero frames (the last one the last image, if given),
        run through the streaming encoder in diffusers' chunks (1, then 4 frames)."""
        xp, to = self.xp, self.backend.to_device
        first, step = self.stages["vae_encoder_first"], self.stages["vae_encoder_step"]
        ts = self.manifest.geometry.temporal_stride
        chunk = np.zeros((1, 3, ts, req.height, req.width), dtype=np.float32)  # (1, 3, 4, H, W)
        out = first(video=to(self.vae_input(image, req)))
        latents = [out.pop("latent")]
        n = (req.frames - 1) // ts
        for k in range(n):
            video = chunk
            if last is not None and k == n - 1:
                video = chunk.copy()
                video[:, :, -1:] = self.vae_input(last, req)  # the last video frame
            caches = {name.removeprefix("new_"): value for name, value in out.items()}
            out = step(video=to(video), **caches)
            latents.append(out.pop("latent"))
        self.release("vae_encoder_first", "vae_encoder_step")
        latent = xp.concatenate(latents, axis=2)  # (1, z, F, h, w)
        return xp.concatenate([self.condition_mask(latent.shape, last is not None), latent], axis=1)

    def condition_mask(self, latent_shape, has_last: bool):
        """The pipeline's mask_lat_size (1, 4, F, h, w): video frames that are given are 1 (the
        first, and the last with a last image), the first repeated to fill its latent frame, then
        grouped 4 video frames per latent frame on channels."""
        xp, ts = self.xp, self.manifest.geometry.temporal_stride
        _, _, F, h, w = latent_shape
        frames = xp.zeros((ts * (F - 1) + 1,), dtype=xp.float32)  # one entry per video frame
        frames[0] = 1
        if has_last:
            frames[-1] = 1
        frames = xp.concatenate([xp.repeat(frames[:1], ts), frames[1:]])  # (4F,): frame 0 four times
        mask = frames.reshape(F, ts).T  # (4, F): channel c of latent frame f is video frame 4f + c
        return xp.ascontiguousarray(xp.broadcast_to(mask[None, :, :, None, None], (1, ts, F, h, w)))

    def encode_clip(self, image: np.ndarray):
        """Wan2.1 I2V: uint8 (H, W, 3) as given -> CLIP embeddings (1, N, D)."""
        pixels = self.backend.to_device(clip_pixels(image, self.clip))
        embeddings = self.stages["image_encoder"](pixels=pixels)["image"]
        self.release("image_encoder")
        return embeddings

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

    def schedule(self, req: WanRequest):
        scheduler = self.scheduler if req.scheduler is None else from_config(
            with_override(self.manifest.family_config["scheduler"], req.scheduler))
        return scheduler, scheduler.schedule(req.steps, req.shift)

    def expert_plan(self, timesteps) -> list[str]:
        """The DiT stage of each step: A14B's high-noise expert while t >= boundary_ratio *
        num_train_timesteps (diffusers' test), the low-noise one after."""
        if self.boundary_ratio is None:
            return [EXPERTS[0]] * len(timesteps)
        train = self.manifest.family_config["scheduler"].get("num_train_timesteps", 1000)
        boundary = self.boundary_ratio * train
        return [EXPERTS[0] if float(t) >= boundary else EXPERTS[1] for t in timesteps]

    def denoise(self, text, conditions: dict, noise, req: WanRequest,
                on_step: Callable[[int, float], None] | None = None, timings: Timings | None = None):
        """The pipeline's loop. `conditions`: "image_latent" (TI2V's frame 0), "condition" (I2V)
        and "image" (Wan2.1 I2V's CLIP embeddings), those the model takes; returns the latent
        (TI2V: with the image's frame in place). `timings.experts` gets each step's DiT stage."""
        xp = self.xp
        scheduler, schedule = self.schedule(req)
        plan = self.expert_plan(schedule.timesteps)
        if timings is not None:
            timings.experts = plan
        batch = text.shape[0]
        image_latent = conditions.get("image_latent")
        mask = self.frame_mask(noise.shape, image_latent is not None)
        token_mask = mask[0, 0][:, ::2, ::2]  # (F, Hp, Wp): the per-token timestep's 0s and 1s
        # the same for both CFG branches: batched once
        batched = {k: v if batch == 1 else xp.concatenate([v] * batch)
                   for k, v in conditions.items() if k in ("condition", "image")}
        extra = {k: v for k, v in batched.items() if k == "condition"}
        context = {"text": text, **{k: v for k, v in batched.items() if k == "image"}}
        guidance = {EXPERTS[0]: req.guidance, EXPERTS[1]: req.guidance_2}
        contexts: dict[str, dict] = {}

        def step_context(expert: str) -> dict:
            """What the expert's step takes of the text (and image): the embeddings, or in a
            --text-kv build their K/V stacks, computed at the expert's first step and kept
            for its others (only the current expert's are held)."""
            if not self.text_kv:
                return context
            if expert not in contexts:
                contexts.clear()
                contexts[expert] = self.stages[f"{expert}_context"](**context)
                self.release(f"{expert}_context")  # --low-memory: run once
            return contexts[expert]

        def model_input(x):
            return x if image_latent is None else (1 - mask) * image_latent + mask * x

        def velocity(x, i):
            t, expert = schedule.timesteps[i], plan[i]
            if i > 0 and plan[i - 1] != expert:
                self.release(plan[i - 1])  # --low-memory: the high-noise expert is done
            if self.per_token_timestep:
                timestep = xp.ascontiguousarray(xp.broadcast_to(token_mask * t, (batch, *token_mask.shape)))
            else:
                timestep = xp.full((batch,), t, dtype=xp.float32)
            latent = model_input(x)
            latent = latent if batch == 1 else xp.concatenate([latent] * batch)
            v = self.stages[expert](latent=latent, timestep=timestep.astype(xp.float32), **step_context(expert),
                                    **extra)["velocity"]
            return v if batch == 1 else guided(v[:1], v[1:], guidance[expert])

        latent = self.sample(noise, schedule, scheduler, self.cached(velocity, req, timings, plan.__getitem__),
                             None, on_step,
                             f"with guidance {req.guidance:g} and shift {req.shift:g}")
        self.release(*self.experts)  # the decoder needs the room more
        return model_input(latent)

    # -- whole generation -------------------------------------------------------------------

    def generate(self, prompt=None, negative_prompt=None, image=None, frames=None, height=None, width=None,
                 steps=None, guidance=None, shift=None, seed=0, scheduler=None, noise=None,
                 on_step: Callable[[int, float], None] | None = None, guidance_2=None,
                 last_image=None, cache=None) -> Generation:
        """`image`: the first frame, a path or a uint8 (H, W, 3) array (resized to the video
        size; image-to-video models need one, TI2V-5B takes one); `last_image`: the last frame
        (Wan2.2 I2V-A14B). `guidance_2`: A14B's low-noise expert's guidance (default: the
        manifest's). `scheduler`: "unipc" or "euler" instead of the checkpoint's. `noise`: the
        initial latent (1, z, F, h, w) float32, diffusers' `latents=`. `cache`: a step cache,
        e.g. "magcache:0.1" (runtime/cache.py; each A14B expert keeps its own)."""
        req = self.check_request(prompt, negative_prompt, image, frames, height, width, steps, guidance,
                                 shift, seed, scheduler, guidance_2, last_image, cache)
        pixels = self.load_image(image) if image is not None else None
        last = self.load_image(last_image, what="last image") if last_image is not None else None
        if noise is not None:
            self.check_noise(noise, self.latent_shape(req.frames, req.height, req.width))
        timings = Timings(encode_label="encode (text, image)" if pixels is not None else "encode (text)")
        frames_out = np.concatenate(list(self.generate_chunks(req, timings, pixels, noise, on_step, last)))
        return Generation(frames_out, timings, req)

    def generate_chunks(self, req: WanRequest, timings: Timings, image: np.ndarray | None = None,
                        noise=None, on_step: Callable[[int, float], None] | None = None,
                        last_image: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """Like `generate` for a checked request and loaded images (uint8 (H, W, 3), `load_image`),
        but yields uint8 frame chunks as the decoder makes them."""
        t_start = time.perf_counter()
        text = self.encode_text(req)
        conditions = {}
        if image is not None and self.condition == "first_frame":
            conditions["image_latent"] = self.encode_image(image, req)
        if image is not None and self.condition == "latents":
            if self.clip is not None:
                conditions["image"] = self.encode_clip(image)
            conditions["condition"] = self.encode_condition(image, last_image, req)
        timings.encode = time.perf_counter() - t_start
        noise = self.noise(req) if noise is None else self.backend.to_device(noise)
        latent = self.denoise(text, conditions, noise, req, self.recorder(timings, on_step), timings)
        yield from self.frames_out(latent, timings, t_start)
