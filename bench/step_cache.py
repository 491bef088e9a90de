"""Step caching (`--cache`, runtime/cache.py) measured: DiT calls saved, end-to-end speed-up and
how far the video moves from the uncached one.

Quality is judged against the uncached video of the same request (same image or prompt, same
noise): PSNR, and for the seed family's scenes (one subject on a plain background) the subject's
shape IoU and colour error frame by frame (export/quality.py's masks). Random-weight models
(the Wan-width bench) give speed figures only: their videos mean nothing.

    python -m bench.step_cache --artifacts artifacts/small [--settings teacache:0.1,magcache:0.05]
"""

from __future__ import annotations

from typing import Callable

import click
import numpy as np

from bench.measure import timed

# What the bench compares: the recommended method at three thresholds, the other at its default.
SETTINGS = ("teacache:0.1", "teacache:0.2", "teacache:0.4", "magcache:0.05")


def subject_agreement(video: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(shape IoU, colour error) of each frame's subject against the same frame of `reference`,
    averaged: how much of the scene the cache changed (1 and 0: nothing)."""
    from export.quality import aligned_iou, foreground_mask
    from runtime.motion import background_colour

    ious, errors = [], []
    for a, b in zip(video, reference):
        ma, mb = foreground_mask(a), foreground_mask(b)
        ious.append(aligned_iou(ma, mb))
        ca = a[ma].mean(0) if ma.any() else background_colour(a)
        cb = b[mb].mean(0) if mb.any() else background_colour(b)
        errors.append(float(np.linalg.norm(ca - cb)))
    return float(np.mean(ious)), float(np.mean(errors))


def cache_records(generate: Callable, requests: list[dict], runs: int, settings=SETTINGS,
                  scenes: bool = True, impl: str = "ort-fp32", **record) -> list[dict]:
    """`generate(cache=..., **request)` -> runtime Generation. Each setting's videos for every
    request against the uncached ones (quality), and the first request timed end to end with and
    without it, back to back. `impl`: what `generate` runs; `record`: fields every record
    carries (model, shapes)."""
    from export.quality import psnr

    base = [generate(**r) for r in requests]
    steps = len(base[0].timings.dit)
    plain = timed(lambda: generate(**requests[0]), runs=runs)
    out = [{"stage": "end_to_end", "impl": impl, "cache": "off", **plain, "steps": steps,
            "dit_calls": steps, **record}]
    for setting in settings:
        videos = [generate(cache=setting, **r) for r in requests]
        t = timed(lambda: generate(cache=setting, **requests[0]), runs=runs)
        quality = {"psnr_db": float(np.mean([psnr(v.frames, b.frames) for v, b in zip(videos, base)]))}
        if scenes:
            agree = [subject_agreement(v.frames, b.frames) for v, b in zip(videos, base)]
            quality.update(shape_iou=float(np.mean([a[0] for a in agree])),
                           colour_error=float(np.mean([a[1] for a in agree])))
        out.append({"stage": "end_to_end", "impl": f"{impl}-cache-{setting.split(':')[0]}", "cache": setting,
                    **t, "steps": steps, "dit_calls": float(np.mean([v.timings.dit_calls for v in videos])),
                    "speedup": plain["median_ms"] / t["median_ms"], **quality, **record})
    return out


def cache_table(records: list[dict]) -> list[str]:
    """results.md rows for the cache records."""
    rows = [r for r in records if "cache" in r]
    if not rows:
        return []
    lines = ["", "Step caching (`--cache`; quality against the uncached video of the same request):", "",
             "| model | runtime | cache | DiT calls / steps | median ms | speed-up | PSNR dB | shape IoU | colour error |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        q = [f"{r[k]:.{d}f}" if k in r else "" for k, d in (("psnr_db", 1), ("shape_iou", 3), ("colour_error", 1))]
        runtime = r["impl"].split("-cache-")[0]
        lines.append(f"| {r.get('model', '')} | {runtime} | {r['cache']} | {r['dit_calls']:g} / {r['steps']} | "
                     f"{r['median_ms']:.0f} | {r.get('speedup', 1.0):.2f}x | {' | '.join(q)} |")
    return lines


def held_out_requests(pipe, count: int) -> list[dict]:
    """Seed-family requests on held-out synthetic scenes (export/quality.py's stream), seeds 0.."""
    from export.quality import STREAM_HELDOUT
    from export.synthetic import ClipSpec, make_clips

    v = pipe.manifest.video
    spec = ClipSpec(frames=v["frames"], height=v["height"], width=v["width"])
    return [{"image": c.frames[0], "seed": i} for i, c in enumerate(make_clips(1, count, spec, STREAM_HELDOUT))]


@click.command()
@click.option("--artifacts", required=True, type=click.Path(exists=True, path_type=str),
              help="A seed-family artifact directory (wan-export --preset small).")
@click.option("--settings", default=",".join(SETTINGS), show_default=True, help="Comma-separated --cache values.")
@click.option("--max-skip", type=click.IntRange(1, 100), help="Override the cache's consecutive-reuse limit.")
@click.option("--clips", default=4, show_default=True, help="Held-out scenes the quality is averaged over.")
@click.option("--runs", default=3, show_default=True, help="Timed runs of the first scene per setting.")
def main(artifacts, settings, max_skip, clips, runs):
    """Sweep step-cache settings on the seed family's held-out scenes; print the table."""
    import dataclasses

    import runtime.cache
    import runtime.seed
    from runtime import Pipeline

    if max_skip is not None:  # research only: the runtime's limit is fixed
        parse = runtime.cache.parse_cache
        runtime.seed.parse_cache = lambda t: None if parse(t) is None else dataclasses.replace(parse(t),
                                                                                              max_skip=max_skip)
    pipe = Pipeline.from_dir(artifacts)
    records = cache_records(pipe.generate, held_out_requests(pipe, clips), runs, settings.split(","),
                            model=pipe.manifest.model.get("name", ""))
    click.echo("\n".join(cache_table(records)))


if __name__ == "__main__":
    main()
