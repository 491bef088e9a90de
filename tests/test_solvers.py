"""numpy solvers vs the PyTorch reference, and what a flow-matching solver must get right."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export import pipeline as ref
from runtime import solvers


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (20, 5.0), (50, 3.0)])
def test_schedule(steps, shift):
    s = solvers.flow_sigmas(steps, shift)
    assert s[0] == 1.0 and s[-1] == 0.0 and np.all(np.diff(s) < 0)
    base = np.linspace(1, 0, steps + 1)
    np.testing.assert_allclose(s, shift * base / (1 + (shift - 1) * base))
    np.testing.assert_array_equal(s, ref.flow_sigmas(steps, shift).numpy())


@pytest.mark.parametrize("name", ["euler", "dpm++2m"])
def test_straight_flow_lands_on_x0(name):
    """On a straight path the velocity noise - x0 is constant: every solver must end at x0."""
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 4, 3, 5)).astype(np.float32)
    sigmas = solvers.flow_sigmas(7, 5.0)
    x, prev = noise, None
    for i in range(7):
        x, prev = solvers.SOLVERS[name](x, noise - x0, sigmas, i, prev)
    np.testing.assert_allclose(x, x0, atol=1e-5)


@pytest.mark.parametrize("name", ["euler", "dpm++2m"])
def test_numpy_matches_torch(name):
    """Same inputs, same velocity field: the runtime and the oracle agree to float32 rounding."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 6)).astype(np.float32) * 0.3

    def field(x):  # a nonlinear velocity field so the 2nd-order terms matter
        return np.tanh(x @ w).astype(np.float32)

    sigmas = solvers.flow_sigmas(10, 5.0)
    tsig = ref.flow_sigmas(10, 5.0)
    x_np = rng.standard_normal((3, 6)).astype(np.float32)
    x_t, p_np, p_t = torch.from_numpy(x_np.copy()), None, None
    for i in range(10):
        x_np, p_np = solvers.SOLVERS[name](x_np, field(x_np), sigmas, i, p_np)
        v_t = torch.from_numpy(field(x_t.numpy()))
        x_t, p_t = ref.SOLVERS[name](x_t, v_t, tsig, i, p_t)
    np.testing.assert_allclose(x_np, x_t.numpy(), rtol=0, atol=1e-6)


def test_second_order_beats_euler():
    """Gaussian data x0 ~ N(0, c^2) has an exact denoiser and an exact ODE solution (the flow
    keeps x / std(x_sigma) constant, so it ends at c * noise): dpm++2m must converge to it and
    beat Euler clearly at the same step count."""
    c, noise = 0.5, np.linspace(-2, 2, 9)

    def velocity(x, sigma):
        x0 = (1 - sigma) * c * c * x / ((1 - sigma) ** 2 * c * c + sigma**2)  # E[x0 | x_sigma]
        return (x - x0) / sigma

    def error(name, steps):
        s = solvers.flow_sigmas(steps, 1.0)
        x, prev = noise, None
        for i in range(steps):
            x, prev = solvers.SOLVERS[name](x, velocity(x, s[i]), s, i, prev)
        return np.abs(x - c * noise).max()

    assert error("dpm++2m", 8) < 0.5 * error("euler", 8)
    assert error("dpm++2m", 16) < 0.5 * error("dpm++2m", 8)


def test_guidance():
    c, u = np.array([2.0]), np.array([1.0])
    assert solvers.guided(c, u, 1.0) == c and solvers.guided(c, u, 0.0) == u
    assert solvers.guided(c, u, 5.0) == 6.0


def test_reference_frame():
    """Frame 0 becomes each batch item's reference (one shared, or one per item as in the CFG
    batch); the other frames and the input are left alone; numpy and torch agree."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 3, 5, 6)).astype(np.float32)
    before = x.copy()
    for refs in (rng.standard_normal((1, 4, 1, 5, 6)), rng.standard_normal((2, 4, 1, 5, 6))):
        refs = refs.astype(np.float32)
        got = solvers.with_reference_frame(x, refs)
        np.testing.assert_array_equal(x, before)
        np.testing.assert_array_equal(got[:, :, 1:], x[:, :, 1:])
        np.testing.assert_array_equal(got[:, :, :1], np.broadcast_to(refs, (2, 4, 1, 5, 6)))
        want = ref.with_reference_frame(torch.from_numpy(x), torch.from_numpy(refs))
        np.testing.assert_array_equal(got, want.numpy())


def test_guidance_rescale():
    """Rescale 0 is plain guidance; rescale 1 gives each latent frame of the guided clean
    estimate the conditional one's spread; the runtime and the reference share the formula."""
    rng = np.random.default_rng(0)
    x, v_c, v_u = rng.standard_normal((3, 1, 4, 3, 5, 6)).astype(np.float32)
    v_u = 0.5 * v_u + 2.0  # an unconditional branch far from the conditional one
    sigma, g = 0.6, 3.0
    plain = solvers.guided(v_c, v_u, g)
    np.testing.assert_array_equal(solvers.rescale_frames(plain, v_c, x, sigma, 0.0), plain)
    spread = lambda v: (x - sigma * v).std(axis=(1, 3, 4))  # noqa: E731 - per latent frame
    assert not np.allclose(spread(plain), spread(v_c), rtol=0.1)
    np.testing.assert_allclose(spread(solvers.rescale_frames(plain, v_c, x, sigma, 1.0)), spread(v_c),
                               rtol=1e-5)
    half = solvers.rescale_frames(plain, v_c, x, sigma, 0.7)
    want = ref.rescale_frames(*(torch.from_numpy(a) for a in (plain, v_c, x)), sigma, 0.7)
    np.testing.assert_allclose(half, want.numpy(), rtol=1e-5, atol=1e-5)
