"""What a generation request may hold: the bounds of every number, checked in one place.

The CLI, the Python API and the export (a preset's sampler defaults) all check through these
functions, so a value is refused with the same one line wherever it comes from. Numbers are
accepted as any integral / real Python or numpy number; bools and strings are refused.

The bounds are what the sampler represents faithfully, not what the model was tuned for:
    steps      1..1000: the flow's 1000 training timesteps; beyond them no new noise levels, and
               a huge count only allocates (10^10 steps asked for 74 GiB of sigmas)
    guidance   0..100: with guidance in the thousands the CFG sum dwarfs the prediction; the
               non-finite checks (runtime/backends.py) catch what is left
    shift      0.01..100: below, the shifted sigmas underflow towards 0 (shift 1e-300 gave blank
               frames); above, every sigma but the last sits at 1 (1e308 overflowed)
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass

from runtime.errors import WanError

MAX_STEPS = 1000
MAX_GUIDANCE = 100.0
SHIFT_RANGE = (0.01, 100.0)
MAX_SEED = 2**63 - 1
SOLVER_NAMES = ("euler", "dpm++2m")


@dataclass(frozen=True)
class Request:
    """A validated generation request; `None`s in the user's call were filled from the manifest."""

    frames: int
    height: int
    width: int
    steps: int
    guidance: float
    guidance_rescale: float
    shift: float
    solver: str
    seed: int
    motion: object | None  # runtime.motion.Motion; None: a random motion drawn from the seed
    cache: object | None = None  # runtime.cache.CacheSetting; None: every step runs the DiT


def _show(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def whole(name: str, value, lo: int, hi: int, rule: str | None = None) -> int:
    """`value` as an int if it is an integral number (not a bool) from lo to hi; `rule` says
    what is allowed in the error (default: the range)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
        rule = rule or f"use a whole number from {lo} to {hi}"
        raise WanError(f"{name} {_show(value)} is not allowed: {rule}")
    return int(value)


def real(name: str, value, lo: float, hi: float, note: str = "") -> float:
    """`value` as a float if it is a finite real number (not a bool) from lo to hi."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or not lo <= value <= hi):
        raise WanError(f"{name} {_show(value)} is not allowed: use a finite number from {lo:g} to "
                       f"{hi:g}{note}")
    return float(value)


def check_sampler(steps, guidance, guidance_rescale, shift, solver) -> tuple[int, float, float, float, str]:
    """The sampling values, checked and normalized (int, float, float, float, str)."""
    steps = whole("steps", steps, 1, MAX_STEPS)
    guidance = real("guidance", guidance, 0.0, MAX_GUIDANCE, " (1 disables classifier-free guidance)")
    guidance_rescale = real("guidance rescale", guidance_rescale, 0.0, 1.0,
                            " (0 is plain classifier-free guidance)")
    shift = real("shift", shift, *SHIFT_RANGE)
    if solver not in SOLVER_NAMES:
        raise WanError(f"solver {_show(solver)} is not allowed: use one of {', '.join(SOLVER_NAMES)}")
    return steps, guidance, guidance_rescale, shift, solver


def available_cpus() -> int:
    """CPUs this process may run on (its affinity, which a container's limit sets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_threads(threads) -> int | None:
    """ONNX Runtime intra-op threads: None (all CPUs) or 1..available CPUs. More threads than
    CPUs only contend (200 threads ran 48x slower on 2 cores)."""
    if threads is None:
        return None
    n = available_cpus()
    return whole("threads", threads, 1, n, f"use a whole number from 1 to {n} (the CPUs this process "
                 "may run on)")
