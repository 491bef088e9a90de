"""Step caching (`--cache METHOD[:THRESHOLD]`, off by default): skip a DiT call when the step
barely differs from the last one that ran, and reuse that call's velocity.

The runtime drives whole-step graphs (ONNX, TensorRT), so what a step can reuse is the graph's
output: the guided velocity, i.e. the whole transformer's contribution to the flow. Caches that
reuse a residual inside the model (TeaCache's modulated-input test, first-block caching) need
the step split into graphs at that point; the two rules here decide from what the loop sees.

    teacache   accumulate the relative L1 change of the DiT's input latent from step to step
               (mean |x_i - x_i-1| / mean |x_i-1|); reuse while the sum stays under THRESHOLD,
               run the DiT and reset it once it does not. TeaCache's rule, on the latent the
               graph takes rather than the first block's modulated input.
    magcache   predict the ratio of this step's velocity magnitude to the last computed one's
               from the last two computed steps (MagCache's observation: the ratio changes
               slowly and smoothly along the flow), accumulate the predicted error |1 - ratio
               product| over the reused steps, and reuse while it stays under THRESHOLD.
               MagCache calibrates the ratios offline per model; these are measured online.

Both: the first `warmup` share of the steps and the last step always run (the layout forms
early; the last step sets the detail), at most `max_skip` steps in a row are reused, and each
A14B expert has its own state (a step never reuses the other expert's velocity; an expert's
first step always runs). With CFG both branches are one batched call: they are reused together.
docs/step-caching.md has the measurements behind the defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from runtime.errors import WanError

# The threshold each method takes when none is given: the measured knee on `small` (docs/step-caching.md).
DEFAULT_THRESHOLDS = {"teacache": 0.2, "magcache": 0.05}
MAX_THRESHOLD = 10.0


@dataclass(frozen=True)
class CacheSetting:
    method: str  # one of DEFAULT_THRESHOLDS
    threshold: float
    max_skip: int = 2  # consecutive reused steps at most
    warmup: float = 0.2  # share of the first steps that always run

    def describe(self) -> str:
        return f"{self.method}:{self.threshold:g}"

    def warmup_steps(self, steps: int) -> int:
        return max(1, round(self.warmup * steps))


def parse_cache(text) -> CacheSetting | None:
    """'teacache', 'magcache:0.05', 'off' or None -> the setting (None: no caching); a one-line
    WanError for anything else."""
    if text is None or text == "off":
        return None
    rule = (f"use METHOD or METHOD:THRESHOLD with METHOD one of {', '.join(DEFAULT_THRESHOLDS)} and "
            f"THRESHOLD a number above 0 and at most {MAX_THRESHOLD:g} (or off)")
    if not isinstance(text, str):
        raise WanError(f"cache {text!r} is not allowed: {rule}")
    method, colon, value = text.partition(":")
    if method not in DEFAULT_THRESHOLDS or (colon and not value):
        raise WanError(f"cache {text!r} is not allowed: {rule}")
    try:
        threshold = float(value) if value else DEFAULT_THRESHOLDS[method]
    except ValueError:
        raise WanError(f"cache {text!r} is not allowed: {rule}") from None
    if not (math.isfinite(threshold) and 0 < threshold <= MAX_THRESHOLD):
        raise WanError(f"cache {text!r} is not allowed: {rule}")
    return CacheSetting(method, threshold)


@dataclass
class _Group:
    """One expert's cache state."""

    v: object = None  # the last computed velocity
    step: int = -1  # its step
    norm: float = 0.0  # its mean |v|
    ratio: float | None = None  # magcache: per-step magnitude ratio of the last two computed steps
    x_prev: object = None  # teacache: the previous step's input latent
    error: float = 0.0  # the accumulated change (teacache) or predicted error (magcache)
    product: float = 1.0  # magcache: the predicted ratio product over the reused steps
    run: int = 0  # steps reused in a row


@dataclass
class StepCache:
    """Wraps the loop's `velocity(x, i)`; `reused` lists the steps whose DiT call was skipped."""

    setting: CacheSetting
    steps: int
    xp: object  # numpy or cupy: where the latents live
    groups: dict[str, _Group] = field(default_factory=dict)
    reused: list[int] = field(default_factory=list)

    def wrap(self, velocity: Callable, group_of: Callable[[int], str] = lambda i: "dit") -> Callable:
        def cached(x, i):
            g = self.groups.setdefault(group_of(i), _Group())
            if self.can_reuse(g, x, i):
                g.run += 1
                g.x_prev = x
                self.reused.append(i)
                return g.v
            v = velocity(x, i)
            if self.setting.method == "magcache":  # the only rule that reads the magnitudes
                norm = float(self.xp.abs(v).mean())
                if g.v is not None and g.norm > 0:
                    g.ratio = (norm / g.norm) ** (1.0 / (i - g.step))  # per step, over the gap
                g.norm = norm
            g.v, g.step, g.x_prev = v, i, x
            g.error, g.product, g.run = 0.0, 1.0, 0
            return v

        return cached

    def can_reuse(self, g: _Group, x, i: int) -> bool:
        s = self.setting
        if g.v is None or i < s.warmup_steps(self.steps) or i == self.steps - 1 or g.run >= s.max_skip:
            return False
        if s.method == "teacache":
            base = float(self.xp.abs(g.x_prev).mean())
            change = float(self.xp.abs(x - g.x_prev).mean()) / base if base > 0 else math.inf
            error = g.error + change
        else:
            if g.ratio is None:  # one computed step: no ratio to predict from yet
                return False
            product = g.product * g.ratio
            error = g.error + abs(1.0 - product)
        if error >= s.threshold:
            return False
        g.error = error
        if s.method == "magcache":
            g.product = product
        return True
