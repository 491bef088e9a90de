"""`wan-run`: generate a video from an artifact directory, or through a wan-serve server (a thin
layer over runtime.job and serve.client)."""

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
\b
Through a Triton server (wan-serve repo + wan-serve start; the same options, no artifacts here):
  wan-run --server 127.0.0.1:8001 --image examples/reference.png -o out.mp4

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


@click.command(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"],
                                                  "max_content_width": 100})
@click.argument("artifacts", required=False, type=click.Path(path_type=str))
@click.option("--server", metavar="HOST:PORT", help="Generate through a Triton server's `wan` model (wan-serve "
              "start; its gRPC port) instead of from ARTIFACTS; the server's repository fixes precision and "
              "backend.")
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
@click.option("--cache", metavar="METHOD[:THRESHOLD]", help="Step caching (off by default): reuse the last DiT "
              "call's velocity while the steps barely change. teacache (default threshold 0.2: the "
              "accumulated relative change of the input latent) or magcache (0.05: the predicted drift of the "
              "velocity's magnitude); a higher threshold skips more. Each A14B expert caches on its own.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]),
              help="Which built precision of the graphs to run (default: fp32).")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), help="onnxruntime (CPU, or CUDA with onnxruntime-gpu; the default) or "
              "tensorrt (the .plan engines of wan-export --tensorrt; needs an NVIDIA GPU).")
@click.option("--low-memory", is_flag=True, help="Released models: hold only the stage that runs (one "
              "A14B expert at a time; the encoders only while encoding). Lower peak memory, slower start.")
@click.option("--threads", type=int, help="CPU threads for ONNX Runtime (default: all cores; at most "
              "the CPUs this process may use).")
@click.option("--verify", type=click.Choice(["auto", "full", "none"]),
              help="File integrity check (default: auto, which re-hashes only files changed since last checked).")
@click.option("--expect-manifest", metavar="SHA256", help="Refuse the artifacts unless manifest.json "
              "has this sha256 (wan-export prints it); every file is then re-hashed.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output: a video, or a folder "
              "holding only frames (anything else is refused).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or timing table.")
@click.option("--debug", is_flag=True, help="Tracebacks and debug logging.")
def main(artifacts, server, prompt, negative_prompt, image, last_image, output, frames, height, width, steps,
         guidance, guidance_2, shift, scheduler, guidance_rescale, solver, seed, move, bend, turn, zoom, still, fps,
         cache, precision, backend, low_memory, threads, verify, expect_manifest, overwrite, quiet, debug):
    """Generate a video from a wan-export artifact directory (or through a wan-serve server):
    from a text prompt (released Wan models; TI2V-5B also from a first frame), or by animating a
    reference image (the project's own model)."""
    from runtime.files import regular_file
    from runtime.job import Options
    from runtime.media import check_fps, check_output, output_kind
    from runtime.request import check_threads

    opts = Options(prompt, negative_prompt, image, last_image, frames, height, width, steps, guidance, guidance_2,
                   shift, scheduler, guidance_rescale, solver, seed, move, bend, turn, zoom, still, cache)
    check_output(output, overwrite, fps)  # fail on a bad output name before any slow work
    check_threads(threads)
    for what, path in (("image", image), ("last image", last_image)):
        if path is not None:
            regular_file(path, what)  # before the artifacts are loaded (a FIFO would hang)
    if server is not None:
        local = [flag for flag, value in (("ARTIFACTS", artifacts), ("--precision", precision),
                                          ("--backend", backend), ("--low-memory", low_memory or None),
                                          ("--threads", threads), ("--verify", verify),
                                          ("--expect-manifest", expect_manifest)) if value is not None]
        if local:
            raise WanError(f"{local[0]} does not apply with --server: the server's repository (wan-serve repo) "
                           "holds the artifacts and fixes how they run")
        from serve.client import RemoteJob

        job = RemoteJob(server, opts)  # accepted by the server: closed below whatever happens
        default_fps = job.fps
    else:
        if artifacts is None:
            raise WanError("give an artifact directory (wan-export --out) or --server HOST:PORT")
        from runtime.job import prepare
        from runtime.pipeline import Pipeline

        pipe = Pipeline.from_dir(artifacts, precision=precision or "fp32", backend=backend or "onnxruntime",
                                 verify=verify or "auto", threads=threads, expect_manifest=expect_manifest,
                                 low_memory=low_memory)
        job = prepare(pipe, opts)
        default_fps = pipe.manifest.sampler["fps"]
    req = job.request
    try:
        fps = check_fps(default_fps if fps is None else fps, output_kind(output))
        path = write_with_progress(job.chunks, req.steps, output, fps, overwrite, quiet)
    finally:
        job.close()  # a remote request still running is cancelled
    if not quiet:
        click.echo(f"wrote {path} ({req.frames} frames, {req.width}x{req.height}, {req.steps} steps, "
                   f"{job.summary[0]})")
        for line in job.summary[1:]:
            click.echo(line)
        click.echo(job.timings.table())


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
