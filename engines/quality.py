"""How much a reduced-precision build loses: per-stage error and end-to-end PSNR vs fp32.

Both are measured on held-out inputs (seeds the calibration never saw) with the runtime itself,
so the numbers describe what a user of `wan-run --precision P` gets.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

# End-to-end PSNR of the decoded uint8 video vs the fp32 build, same seed and noise.
PSNR_BARS_DB = {"fp16": 40.0, "int8": 30.0}


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Max abs error, and max abs error relative to the reference's largest magnitude."""
    err = float(np.max(np.abs(reference.astype(np.float64) - candidate.astype(np.float64))))
    scale = float(np.max(np.abs(reference))) or 1.0
    return {"max_abs": err, "max_rel": err / scale, "finite": bool(np.isfinite(candidate).all())}


def worst(results: list[dict]) -> dict:
    return {"max_abs": max(r["max_abs"] for r in results),
            "max_rel": max(r["max_rel"] for r in results),
            "finite": all(r["finite"] for r in results)}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def stage_error(fp32_session, session, samples: list[dict[str, np.ndarray]]) -> dict:
    """Worst error of `session` against `fp32_session` (runtime StageSessions) over samples."""
    results = []
    for inputs in samples:
        ref, got = fp32_session(**inputs), session(**inputs)
        results.extend(compare(ref[k], got[k]) for k in ref)
    return worst(results)


def end_to_end(reference_pipe, pipe, images: list[np.ndarray], seeds: list[int]) -> dict:
    """PSNR of `pipe`'s videos vs `reference_pipe`'s at the manifest defaults, same noise;
    also whether every stage output stayed finite."""
    scores, finite = [], True
    for image, seed in zip(images, seeds):
        req = pipe.check_request(seed=seed)
        noise = pipe.noise(req)
        want = reference_pipe.generate(image, seed=seed, noise=noise).frames
        ref_latent = pipe.encode_reference(image)
        maps, _ = pipe.motion_maps(image, req)  # the seed's motion, as `generate` draws it
        latent = pipe.denoise(ref_latent, maps, noise, req)
        video = pipe.decode_video(latent)
        finite &= all(bool(np.isfinite(pipe.backend.to_host(a)).all()) for a in (ref_latent, latent, video))
        from runtime.pipeline import to_uint8

        scores.append(psnr(want, to_uint8(video)))
    return {"psnr_db": min(scores), "psnr_db_each": scores, "finite": finite, "seeds": seeds}
