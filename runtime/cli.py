"""`wan-run`: generate a video from an artifact directory (a thin layer over runtime.Pipeline)."""

from __future__ import annotations

import logging
import sys

import click

from runtime.errors import WanError, run_cli

log = logging.getLogger(__name__)

EXAMPLES = """
\b
Examples:
  wan-run artifacts/small --image examples/reference.png -o out.mp4
  wan-run artifacts/small --image ref.png --frames 33 --steps 30 --solver euler -o clip.gif
  wan-run artifacts/small --image ref.png --seed 7 -o frames/      # a folder of PNGs
  wan-run artifacts/small --image ref.png --move 0.3,-0.1 --turn 45 -o right_up.mp4
  wan-run artifacts/small --image ref.png --move 0.25,0 --bend 0.05 --zoom 1.3 -o arc.mp4

Defaults for frames, size, steps, guidance (and its rescale), shift, solver and fps come from the
artifact's manifest (the preset it was exported from). The same seed gives the same video.

Motion: the subject (whatever stands out from the plain background of the reference) moves from
where it is by --move, along a path bent by --bend, turning by --turn and scaling to --zoom by the
last frame. Give any of them and the others default to none; give none and a random motion is
drawn from the seed (printed at the end); --still keeps the subject in place. Distances are
fractions of the frame's shorter side, x to the right and y down.
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


@click.command(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"],
                                                  "max_content_width": 100})
@click.argument("artifacts", type=click.Path(path_type=str))
@click.option("--image", "-i", required=True, type=click.Path(path_type=str),
              help="Reference image (any format Pillow reads); resized and centre-cropped.")
@click.option("--output", "-o", required=True, type=click.Path(path_type=str),
              help="Output: NAME.mp4 (H.264), NAME.gif, or a folder name for PNG frames.")
@click.option("--frames", type=int, help="Frame count, 4n+1 (1, 5, 9, 13, 17, ...).")
@click.option("--height", type=int, help="Height in pixels, a multiple of 16.")
@click.option("--width", type=int, help="Width in pixels, a multiple of 16.")
@click.option("--steps", type=int, help="Denoising steps (>= 1).")
@click.option("--guidance", type=float, help="Classifier-free guidance scale (1 = off).")
@click.option("--guidance-rescale", type=float,
              help="0 to 1: pull each guided frame's spread back toward the conditional "
              "prediction's, against over-saturated colours at high guidance (0 = plain CFG).")
@click.option("--shift", type=float, help="Flow-matching sigma shift (> 0).")
@click.option("--solver", type=click.Choice(["euler", "dpm++2m"]), help="ODE solver.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Noise seed (and the random motion's, when no motion is given).")
@click.option("--move", metavar="DX,DY", help="Where the subject's centre ends, from where it starts, in "
              "fractions of the shorter side (x right, y down); distance at most 0.5.")
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
def main(artifacts, image, output, frames, height, width, steps, guidance, guidance_rescale, shift,
         solver, seed, move, bend, turn, zoom, still, fps, precision, backend, threads, verify,
         expect_manifest, overwrite, quiet, debug):
    """Generate a video that animates a reference image, from a wan-export artifact directory."""
    from runtime.files import regular_file
    from runtime.media import check_fps, check_output, load_image, output_kind, write_video
    from runtime.pipeline import Pipeline, Timings
    from runtime.request import check_threads

    check_output(output, overwrite, fps)  # fail on a bad output name before any slow work
    motion = motion_from_options(move, bend, turn, zoom, still)  # checked by check_request
    check_threads(threads)
    regular_file(image, "reference image")  # before the artifacts are loaded (a FIFO would hang)
    pipe = Pipeline.from_dir(artifacts, precision=precision, backend=backend, verify=verify,
                             threads=threads, expect_manifest=expect_manifest)
    req = pipe.check_request(frames, height, width, steps, guidance, shift, solver, seed, guidance_rescale,
                             motion)
    fps = check_fps(pipe.manifest.sampler["fps"] if fps is None else fps, output_kind(output))
    ref = load_image(image, req.height, req.width)
    maps, used = pipe.motion_maps(ref, req)  # the motion given, or the one the seed draws

    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=req.steps, desc="denoising", unit="step", file=sys.stderr, leave=False)
    timings = Timings()
    try:
        # Frames go to the writer as the streaming decoder makes them (written atomically:
        # the output appears only once complete).
        chunks = pipe.generate_chunks(ref, req, timings,
                                      on_step=(lambda i, s: bar.update(1)) if bar else None, maps=maps)
        path = write_video(chunks, output, fps=fps, overwrite=overwrite)
    finally:
        if bar is not None:
            bar.close()
    if not quiet:
        click.echo(f"wrote {path} ({req.frames} frames, {req.width}x{req.height}, "
                   f"{req.steps} steps, {req.solver}, guidance {req.guidance} "
                   f"rescaled {req.guidance_rescale}, seed {req.seed})")
        if pipe.takes_motion:
            click.echo(f"motion: {used.describe()}" + (" (drawn from the seed)" if motion is None else ""))
        click.echo(timings.table())


entry_point = run_cli(main, "wan-run")
