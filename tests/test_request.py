"""The Python API's values: the same checks and one-line errors as the CLI, and no video from a
run that went NaN/Inf."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from runtime import Pipeline, WanError
from runtime.errors import NonFiniteError


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return Pipeline.from_dir(tiny_dir)


def test_integral_numbers_are_accepted(pipe):
    req = pipe.check_request(frames=np.int64(5), steps=np.int32(2), height=np.uint16(48), seed=np.int64(3),
                             guidance=np.float32(2.5), shift=4)
    assert (req.frames, req.steps, req.height, req.seed, req.guidance, req.shift) == (5, 2, 48, 3, 2.5, 4.0)
    assert all(type(v) is int for v in (req.frames, req.steps, req.height, req.seed))


@pytest.mark.parametrize("kwargs, needle", [
    ({"steps": True}, "steps True is not allowed: use a whole number from 1 to 1000"),
    ({"frames": 9.0}, "frames 9.0 is not allowed: use 4n+1 frames"),
    ({"frames": "9"}, "frames '9' is not allowed"),
    ({"height": 64.0}, "height 64.0 is not allowed: use a multiple of 16"),
    ({"steps": 10**10}, "steps 10000000000 is not allowed"),
    ({"guidance": 1e38}, "guidance 1e+38 is not allowed: use a finite number from 0 to 100"),
    ({"guidance": "5"}, "guidance '5' is not allowed"),
    ({"shift": 1e-300}, "shift 1e-300 is not allowed"),
    ({"shift": 1e308}, "shift 1e+308 is not allowed"),
    ({"shift": False}, "shift False is not allowed"),
    ({"seed": 2**64}, "seed 18446744073709551616 is not allowed"),
    ({"solver": "rk4"}, "solver 'rk4' is not allowed: use one of euler, dpm++2m"),
])
def test_bad_values_are_one_line(pipe, kwargs, needle):
    with pytest.raises(WanError) as err:
        pipe.check_request(**kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_threads_are_bounded(tiny_dir):
    with pytest.raises(WanError, match="threads 10000 is not allowed"):
        Pipeline.from_dir(tiny_dir, threads=10000)
    with pytest.raises(WanError, match="threads True is not allowed"):
        Pipeline.from_dir(tiny_dir, threads=True)


def test_bad_noise_is_refused(pipe, reference_image):
    req = pipe.check_request(frames=5, steps=1)
    noise = np.asarray(pipe.noise(req)).copy()
    noise[0, 0, 1, 0, 0] = np.nan
    with pytest.raises(NonFiniteError, match="noise holds NaN or Inf"):
        pipe.generate(reference_image, frames=5, steps=1, noise=noise)
    with pytest.raises(WanError, match=r"noise has float32 \(1, 4, 2, 8, 8\); expected float32 \(1, 4, 3, 8, 8\)"):
        pipe.generate(reference_image, frames=9, steps=1, noise=noise)


def poison(stage, monkeypatch, value, after=1):
    """Make the stage's session return `value` (an array -> array function) from its `after`-th
    call on, so the stage's own output check sees it, as it would a diverging graph."""
    real_run, calls = stage.session.run, []

    def run(names, feeds):
        calls.append(1)
        outs = real_run(names, feeds)
        return [value(o) for o in outs] if len(calls) >= after else outs

    monkeypatch.setattr(stage, "session", type("Session", (), {"run": staticmethod(run)})())


def test_diverging_dit_stops_the_run_naming_stage_and_step(tiny_dir, reference_image, monkeypatch):
    pipe = Pipeline.from_dir(tiny_dir)
    poison(pipe.stages["dit"], monkeypatch, lambda v: np.full_like(v, np.inf), after=3)
    with pytest.raises(NonFiniteError, match=r"stage dit produced NaN or Inf in its output 'velocity' "
                                             r"at step 3 of 4 \(sigma"):
        pipe.generate(reference_image, frames=5, steps=4)


def test_overflow_in_the_guidance_sum_is_caught(tiny_dir, reference_image, monkeypatch):
    """Finite velocities whose CFG difference overflows float32 (what --guidance 1e38 did):
    numpy's warning is silenced and the step reports it instead."""
    pipe = Pipeline.from_dir(tiny_dir)
    sign = np.array([1, -1], np.float32).reshape(2, 1, 1, 1, 1)  # conditional vs null branch
    poison(pipe.stages["dit"], monkeypatch, lambda v: np.float32(3e38) * sign * np.ones_like(v))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning: overflow is reported as one line
        with pytest.raises(NonFiniteError, match="the sampled latent became NaN or Inf at step 1 of 2"):
            pipe.generate(reference_image, frames=5, steps=2, guidance=3.0)


def test_diverging_decoder_is_named(tiny_dir, reference_image, monkeypatch):
    pipe = Pipeline.from_dir(tiny_dir)
    poison(pipe.stages["vae_decoder_step"], monkeypatch, lambda v: np.full_like(v, np.nan))
    with pytest.raises(NonFiniteError, match="stage vae_decoder_step produced NaN or Inf"):
        pipe.generate(reference_image, frames=5, steps=1)
