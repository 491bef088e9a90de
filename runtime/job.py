"""One video to generate, from a user's options: what `wan-run` and the Triton `wan` model share.

    opts = Options(prompt="...", image="cat.png", steps=30)   # as the user gave them (None: default)
    job = prepare(pipe, opts)         # every value checked, images read; one-line WanErrors
    for chunk in job.chunks(on_step): # uint8 frame chunks (n, H, W, 3) as the decoder makes them
        ...
    job.summary, job.timings          # what was run, and how long each stage took

Locally an image is a path; through the server it is the file's bytes under the client's
name for it (`media.SentFile`), so both give the same frames and the same error lines.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterator

from runtime.errors import WanError
from runtime.media import SentFile
from runtime.pipeline import Timings


@dataclass(frozen=True)
class Options:
    """A generation request as the user gave it; None means the manifest's default."""

    prompt: str | None = None
    negative_prompt: str | None = None
    image: str | SentFile | None = None
    last_image: str | SentFile | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance: float | None = None
    guidance_2: float | None = None
    shift: float | None = None
    scheduler: str | None = None
    guidance_rescale: float | None = None
    solver: str | None = None
    seed: int = 0
    move: str | None = None
    bend: float | None = None
    turn: float | None = None
    zoom: float | None = None
    still: bool = False
    cache: str | None = None  # runtime.cache: "METHOD[:THRESHOLD]"

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


# Options that only one family reads; giving one to the other is refused, not ignored.
SEED_ONLY = ("move", "bend", "turn", "zoom", "still", "guidance_rescale", "solver")
WAN_ONLY = ("prompt", "negative_prompt", "scheduler", "guidance_2", "last_image")


@dataclass
class Job:
    request: object  # the family's checked request (runtime.request.Request or runtime.wan.WanRequest)
    summary: list[str]  # what runs: sampler, guidance, seed (and the seed family's motion)
    timings: Timings
    _make: Callable = field(repr=False)

    def chunks(self, on_step: Callable[[int, float], None] | None = None) -> Iterator:
        """Generate: uint8 frame chunks (n, H, W, 3); `on_step(i, seconds)` after each step."""
        return self._make(on_step)

    def close(self) -> None:
        """Nothing to let go locally (serve.client.RemoteJob ends its stream here)."""


def parse_move(text: str | None) -> tuple[float, float] | None:
    """'DX,DY' -> (dx, dy); a one-line WanError for anything else."""
    if text is None:
        return None
    parts = text.split(",") if isinstance(text, str) else []
    try:
        if len(parts) != 2:
            raise ValueError
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise WanError(f"move {text!r} is not allowed: use DX,DY (two numbers, e.g. 0.3,-0.1)") from None


def motion_from_options(opts: Options):
    """The Motion the options describe, or None for a random one drawn from the seed."""
    from runtime.motion import Motion

    given = [getattr(opts, n) is not None for n in ("move", "bend", "turn", "zoom")]
    if opts.still and any(given):
        raise WanError("--still is not allowed with --move, --bend, --turn or --zoom")
    if opts.still:
        return Motion()
    if not any(given):
        return None
    return Motion(parse_move(opts.move) or (0.0, 0.0), opts.bend or 0.0, opts.turn or 0.0,
                  1.0 if opts.zoom is None else opts.zoom)


def check_family_options(opts: Options, family: str) -> None:
    """Refuse an option the artifacts' model family does not read, naming the flag."""
    foreign = [n for n in (SEED_ONLY if family == "wan" else WAN_ONLY)
               if getattr(opts, n) is not None and getattr(opts, n) is not False]  # 0 is given
    if foreign:
        flag = "--" + foreign[0].replace("_", "-")
        kind = "a released Wan model" if family == "wan" else "the project's own model (it takes no text)"
        raise WanError(f"{flag} does not apply to these artifacts: they hold {kind}")


def prepare(pipe, opts: Options) -> Job:
    """Check `opts` against `pipe`'s artifacts and read the images: a Job ready to run, or a
    one-line WanError before any stage has run."""
    check_family_options(opts, pipe.manifest.family)
    if pipe.manifest.family == "wan":
        return _wan_job(pipe, opts)
    return _seed_job(pipe, opts)


def cache_note(req) -> str:
    return f", cache {req.cache.describe()}" if req.cache is not None else ""


def _timings(with_image: bool, both: str, one: str) -> Timings:
    return Timings(encode_label=f"encode ({both if with_image else one})")


def _wan_job(pipe, o: Options) -> Job:
    from runtime.schedulers import SHORT_NAMES

    req = pipe.check_request(o.prompt, o.negative_prompt, o.image, o.frames, o.height, o.width, o.steps,
                             o.guidance, o.shift, o.seed, o.scheduler, o.guidance_2, o.last_image, o.cache)
    pixels = pipe.load_image(o.image) if o.image is not None else None
    last = pipe.load_image(o.last_image, what="last image") if o.last_image is not None else None
    name = SHORT_NAMES[req.scheduler] if req.scheduler else pipe.scheduler.name
    guidance = f"guidance {req.guidance:g}" + (f"/{req.guidance_2:g}" if req.guidance_2 is not None else "")
    timings = _timings(pixels is not None, "text, image", "text")
    return Job(req, [f"{name}, shift {req.shift:g}, {guidance}, seed {req.seed}{cache_note(req)}"], timings,
               lambda on_step: pipe.generate_chunks(req, timings, pixels, on_step=on_step, last_image=last))


def _seed_job(pipe, o: Options) -> Job:
    from runtime.media import load_image

    if o.image is None:
        raise WanError("this model animates a reference image: give --image")
    motion = motion_from_options(o)  # checked by check_request
    req = pipe.check_request(o.frames, o.height, o.width, o.steps, o.guidance, o.shift, o.solver, o.seed,
                             o.guidance_rescale, motion, o.cache)
    ref = load_image(o.image, req.height, req.width)
    maps, used = pipe.motion_maps(ref, req)  # the motion given, or the one the seed draws
    summary = [f"{req.solver}, guidance {req.guidance} rescaled {req.guidance_rescale}, seed {req.seed}"
               f"{cache_note(req)}"]
    if pipe.takes_motion:
        summary.append(f"motion: {used.describe()}" + (" (drawn from the seed)" if motion is None else ""))
    timings = _timings(True, "reference", "reference")
    return Job(req, summary, timings,
               lambda on_step: pipe.generate_chunks(ref, req, timings, on_step=on_step, maps=maps))
