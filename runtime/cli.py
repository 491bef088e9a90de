"""`wan-run`: generate a video from an artifact directory (a thin layer over runtime.Pipeline)."""

from __future__ import annotations

import logging
import sys

import click

from runtime.errors import WanError, run_cli

log = logging.getLogger(__name__)

EXAMPLES = """
\b
Examples (a released Wan model, exported with wan-export --model):
  wan-run artifacts/wan21 --prompt "a red fox runs through snow" -o fox.mp4
  wan-run artifacts/wan21 --prompt "..." --negative-prompt "blurry" --steps 30 --seed 7 -o clip.mp4
  wan-run artifacts/ti2v --prompt "the cat turns its head" --image cat.png -o cat.mp4   # TI2V-5B
  wan-run artifacts/i2v --prompt "the boat sails away" --image boat.png -o boat.mp4      # I2V
  wan-run artifacts/a14b --prompt "..." --guidance 4 --guidance-2 3 --low-memory -o a.mp4  # A14B
  wan-run artifacts/i2v-a14b --prompt "..." --image first.png --last-image last.png -o b.mp4
\b
Examples (the project's own model):
  wan-run artifacts/small --image examples/reference.png -o out.mp4
  wan-run artifacts/small --image ref.png --frames 33 --steps 30 --solver euler -o clip.gif
  wan-run artifacts/small --image ref.png --seed 7 -o frames/      # a folder of PNGs
  wan-run artifacts/small --image ref.png --move 0.3,-0.1 --turn 45 -o right_up.mp4

Defaults for frames, size, steps, guidance, shift and fps come from the artifact's manifest (the
release's recommended values, or the preset's). The same seed gives the same video.

Released models: --prompt is required; --negative-prompt defaults to "" as in diffusers;
--image is the first frame (resized to the video size): required by image-to-video models,
optional for TI2V-5B; --last-image the last frame (Wan2.2 I2V-A14B); --scheduler swaps the
checkpoint's scheduler (unipc or euler). Wan2.2 A14B runs its high-noise expert with --guidance
and its low-noise expert with --guidance-2; --low-memory holds one expert at a time (and the
encoders only while they run), at the cost of loading them for every video.

The project's own model animates --image. Motion: the subject (whatever stands out from the plain
background) moves from where it is by --move, along a path bent by --bend, turning by --turn and
scaling to --zoom by the last frame. Give any of them and the others default to none; give none
and a random motion is drawn from the seed (printed at the end); --still keeps the subject in
place. Distances are fractions of the frame's shorter side, x to the right and y down.
"""


def parse_move(text: str | None) -> tuple[float, float] | None:
    """'DX,DY' -> (dx, dy); a one-line WanError for anything else."""
    if text is None:
        return None
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise WanError(f"move {text!r} is not allowed: use DX,DY (two numbers, e.g. 0.3,-0.1)") from None


def motion_from_options(move, bend, turn, zoom, still):
    """The Motion the options describe, or None for a random one drawn from the seed."""
    from runtime.motion import Motion

    given = [move is not None, bend is not None, turn is not None, zoom is not None]
    if still and any(given):
        raise WanError("--still is not allowed with --move, --bend, --turn or --zoom")
    if still:
        return Motion()
    if not any(given):
        return None
    return Motion(parse_move(move) or (0.0, 0.0), bend or 0.0, turn or 0.0, 1.0 if zoom is None else zoom)


SEED_ONLY = ("move", "bend", "turn", "zoom", "still", "guidance_rescale", "solver")
WAN_ONLY = ("prompt", "negative_prompt", "scheduler", "guidance_2", "last_image")


@click.command(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"],
                                                  "max_content_width": 100})
@click.argument("artifacts", type=click.Path(path_type=str))
@click.option("--prompt", "-p", help="Released models: what the video shows.")
@click.option("--negative-prompt", help="Released models: what to steer away from (default: \"\", as diffusers).")
@click.option("--image", "-i", type=click.Path(path_type=str),
              help="The project's model: the reference image (resized and centre-cropped). Released models: "
              "the first frame (resized to the video size), required by image-to-video models, optional for "
              "TI2V-5B. Any format Pillow reads.")
@click.option("--last-image", type=click.Path(path_type=str),
              help="Wan2.2 I2V-A14B: the last frame; the video goes from --image to it.")
@click.option("--output", "-o", required=True, type=click.Path(path_type=str),
              help="Output: NAME.mp4 (H.264), NAME.gif, or a folder name for PNG frames.")
@click.option("--frames", type=int, help="Frame count, 4n+1 (1, 5, 9, 13, 17, ...).")
@click.option("--height", type=int, help="Height in pixels, a multiple of the model's pixels per token (16; 32 for Wan2.2's VAE).")
@click.option("--width", type=int, help="Width in pixels, likewise.")
@click.option("--steps", type=int, help="Denoising steps (1-1000).")
@click.option("--guidance", type=float, help="Classifier-free guidance scale, 0-100 (1 = off; released "
              "models: CFG runs above 1).")
@click.option("--guidance-2", "guidance_2", type=float, help="Wan2.2 A14B: the low-noise expert's guidance "
              "scale, 0-100 (default: the release's recommendation, else --guidance).")
@click.option("--shift", type=float, help="Flow-matching sigma shift, 0.01-100 (released models: the "
              "scheduler's flow_shift).")
@click.option("--scheduler", type=click.Choice(["unipc", "euler"]),
              help="Released models: use this scheduler instead of the checkpoint's.")
@click.option("--guidance-rescale", type=float,
              help="The project's model: 0 to 1, pull each guided frame's spread back toward the "
              "conditional prediction's, against over-saturated colours (0 = plain CFG).")
@click.option("--solver", type=click.Choice(["euler", "dpm++2m"]), help="The project's model: ODE solver.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Noise seed (and the random motion's, when no motion is given).")
@click.option("--move", metavar="DX,DY", help="The project's model: where the subject's centre ends, from "
              "where it starts, in fractions of the shorter side (x right, y down); at most 0.5.")
@click.option("--bend", type=float, help="Sideways offset of the path's midpoint, -0.15 to 0.15 "
              "(> 0: to the right of the direction of travel).")
@click.option("--turn", type=float, help="Rotation over the clip in degrees, -90 to 90 (> 0: clockwise).")
@click.option("--zoom", type=float, help="The subject's final scale, 0.667 to 1.5.")
@click.option("--still", is_flag=True, help="Keep the subject in place.")
@click.option("--fps", type=int, help="Frames per second of the written video (1-120; GIF 1-50).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32",
              show_default=True,
              help="Which built precision of the graphs to run.")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime",
              show_default=True, help="onnxruntime (CPU, or CUDA with onnxruntime-gpu) or tensorrt "
              "(the .plan engines of wan-export --tensorrt; needs an NVIDIA GPU).")
@click.option("--low-memory", is_flag=True, help="Released models: hold only the stage that runs (one "
              "A14B expert at a time; the encoders only while encoding). Lower peak memory, slower start.")
@click.option("--threads", type=int, help="CPU threads for ONNX Runtime (default: all cores; at most "
              "the CPUs this process may use).")
@click.option("--verify", type=click.Choice(["auto", "full", "none"]), default="auto",
              show_default=True,
              help="File integrity check: auto re-hashes only files changed since last checked.")
@click.option("--expect-manifest", metavar="SHA256", help="Refuse the artifacts unless manifest.json "
              "has this sha256 (wan-export prints it); every file is then re-hashed.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output: a video, or a folder "
              "holding only frames (anything else is refused).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or timing table.")
@click.option("--debug", is_flag=True, help="Tracebacks and debug logging.")
def main(artifacts, prompt, negative_prompt, image, last_image, output, frames, height, width, steps, guidance,
         guidance_2, shift, scheduler, guidance_rescale, solver, seed, move, bend, turn, zoom, still, fps,
         precision, backend, low_memory, threads, verify, expect_manifest, overwrite, quiet, debug):
    """Generate a video from a wan-export artifact directory: from a text prompt (released Wan
    models; TI2V-5B also from a first frame), or by animating a reference image (the project's
    own model)."""
    from runtime.files import regular_file
    from runtime.media import check_fps, check_output, output_kind
    from runtime.pipeline import Pipeline
    from runtime.request import check_threads

    options = dict(prompt=prompt, negative_prompt=negative_prompt, scheduler=scheduler, guidance_2=guidance_2,
                   last_image=last_image, move=move, bend=bend,
                   turn=turn, zoom=zoom, still=still or None, guidance_rescale=guidance_rescale, solver=solver)
    check_output(output, overwrite, fps)  # fail on a bad output name before any slow work
    check_threads(threads)
    for what, path in (("image", image), ("last image", last_image)):
        if path is not None:
            regular_file(path, what)  # before the artifacts are loaded (a FIFO would hang)
    pipe = Pipeline.from_dir(artifacts, precision=precision, backend=backend, verify=verify,
                             threads=threads, expect_manifest=expect_manifest, low_memory=low_memory)
    family = pipe.manifest.family
    foreign = [n for n in (SEED_ONLY if family == "wan" else WAN_ONLY) if options[n] is not None]
    if foreign:
        flag = "--" + foreign[0].replace("_", "-")
        kind = "a released Wan model" if family == "wan" else "the project's own model (it takes no text)"
        raise WanError(f"{flag} does not apply to these artifacts: they hold {kind}")
    if family == "wan":
        req = pipe.check_request(prompt, negative_prompt, image, frames, height, width, steps, guidance, shift,
                                 seed, scheduler, guidance_2, last_image)
        pixels = pipe.load_image(image) if image is not None else None
        last = pipe.load_image(last_image, what="last image") if last_image is not None else None
        timings, summary = _timings(pixels is not None, "text, image", "text"), _wan_summary(req, pipe)
        make = lambda on_step: pipe.generate_chunks(req, timings, pixels, on_step=on_step,  # noqa: E731
                                                    last_image=last)
    else:
        if image is None:
            raise WanError("this model animates a reference image: give --image")
        from runtime.media import load_image

        motion = motion_from_options(move, bend, turn, zoom, still)  # checked by check_request
        req = pipe.check_request(frames, height, width, steps, guidance, shift, solver, seed, guidance_rescale,
                                 motion)
        ref = load_image(image, req.height, req.width)
        maps, used = pipe.motion_maps(ref, req)  # the motion given, or the one the seed draws
        timings = _timings(True, "reference", "reference")
        summary = [f"{req.solver}, guidance {req.guidance} rescaled {req.guidance_rescale}, seed {req.seed}"]
        if pipe.takes_motion:
            summary.append(f"motion: {used.describe()}" + (" (drawn from the seed)" if motion is None else ""))
        make = lambda on_step: pipe.generate_chunks(ref, req, timings, on_step=on_step, maps=maps)  # noqa: E731
    fps = check_fps(pipe.manifest.sampler["fps"] if fps is None else fps, output_kind(output))
    path = write_with_progress(make, req.steps, output, fps, overwrite, quiet)
    if not quiet:
        click.echo(f"wrote {path} ({req.frames} frames, {req.width}x{req.height}, {req.steps} steps, "
                   f"{summary[0]})")
        for line in summary[1:]:
            click.echo(line)
        click.echo(timings.table())


def _timings(with_image: bool, both: str, one: str):
    from runtime.pipeline import Timings

    return Timings(encode_label=f"encode ({both if with_image else one})")


def _wan_summary(req, pipe) -> list[str]:
    from runtime.schedulers import SHORT_NAMES

    name = SHORT_NAMES[req.scheduler] if req.scheduler else pipe.scheduler.name
    guidance = f"guidance {req.guidance:g}" + (f"/{req.guidance_2:g}" if req.guidance_2 is not None else "")
    return [f"{name}, shift {req.shift:g}, {guidance}, seed {req.seed}"]


def write_with_progress(make, steps: int, output, fps: int, overwrite: bool, quiet: bool):
    """Run `make(on_step)` (a generator of frame chunks) into the video writer with a progress
    bar over the denoising steps; frames are written as the streaming decoder makes them, and
    the output appears only once complete."""
    from runtime.media import write_video

    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="denoising", unit="step", file=sys.stderr, leave=False)
    try:
        return write_video(make((lambda i, s: bar.update(1)) if bar else None), output, fps=fps,
                           overwrite=overwrite)
    finally:
        if bar is not None:
            bar.close()


entry_point = run_cli(main, "wan-run")
