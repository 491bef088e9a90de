"""The released Wan checkpoints' schedulers in numpy, step for step equal to diffusers'.

A checkpoint names its scheduler in `scheduler/scheduler_config.json`; `from_config` reads that
dict (the manifest keeps a copy) and refuses, in one line, any setting not ported here. Two are:

    UniPCMultistepScheduler         prediction_type "flow_prediction", use_flow_sigmas: the
                                    Wan default (flow_shift 3.0 for 480p, 5.0 for 720p)
    FlowMatchEulerDiscreteScheduler x <- x + (sigma_next - sigma) * v, with its `shift`

Both follow diffusers' arithmetic: the schedule in float64 then float32, the coefficients as
float32 scalars (diffusers computes them as 0-d float32 tensors), the updates on float32 arrays
in the same order. A schedule is a value (`Schedule`), and a step takes and returns the solver's
history explicitly (`UniPCState`), so there is no hidden step counter to reset between videos:
`step(schedule, i, v, x, state) -> (x_next, state)`. `v` is the model output (the flow velocity).
The DiT is fed `schedule.timesteps[i]` (UniPC's are whole numbers, as diffusers casts them to int64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from runtime.errors import WanError

f32 = np.float32


@dataclass(frozen=True)
class Schedule:
    timesteps: np.ndarray  # (steps,) float32: what the DiT is given at each step
    sigmas: np.ndarray  # (steps + 1,) float32, ending at the final sigma (0)


@dataclass(frozen=True)
class UniPCState:
    """UniPC's history after a step: the converted outputs of the last `order` steps (newest
    last), the sample before the predictor, the order used, and how many steps warmed up."""

    outputs: tuple = ()
    last_sample: np.ndarray | None = None
    order: int = 0
    warmed: int = 0


def _check(config: dict, allowed: dict, name: str) -> None:
    """Refuse a config value this port does not implement (diffusers would honour it)."""
    for key, ok in allowed.items():
        if key in config and not ok(config[key]):
            raise WanError(f"scheduler {name}: {key}={config[key]!r} is not supported by the runtime's "
                           f"port (supported: the settings Wan's releases use)")


# Scalar log/expm1 rounded from double, which is what torch's scalar path gives; numpy's float32
# SIMD kernels differ in the last bit for about half the values, and the UniPC coefficients
# (h*phi_k, differences of near-equal numbers) amplify that to 4e-5 at order 3.
def _log32(x) -> np.float32:
    return f32(math.log(float(x))) if x > 0 else f32(-math.inf)


def _expm1_32(x) -> np.float32:
    return f32(math.expm1(float(x))) if math.isfinite(x) else f32(-1.0 if x < 0 else math.inf)


def _shift(sigmas, shift: float):
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class FlowUniPC:
    """diffusers' UniPCMultistepScheduler with flow sigmas (predictor UniP, corrector UniC,
    B(h) variants bh1/bh2, data prediction)."""

    name = "UniPCMultistepScheduler"

    def __init__(self, config: dict):
        _check(config, {
            "prediction_type": lambda v: v == "flow_prediction",
            "use_flow_sigmas": lambda v: v is True,
            "predict_x0": lambda v: v is True,
            "solver_type": lambda v: v in ("bh1", "bh2", "midpoint", "heun", "logrho"),
            "solver_order": lambda v: v in (1, 2, 3),
            "thresholding": lambda v: not v,
            "use_karras_sigmas": lambda v: not v, "use_exponential_sigmas": lambda v: not v,
            "use_beta_sigmas": lambda v: not v, "use_dynamic_shifting": lambda v: not v,
            "shift_terminal": lambda v: not v, "solver_p": lambda v: v is None,
            "final_sigmas_type": lambda v: v in ("zero", "sigma_min"),
        }, self.name)
        self.train_steps = int(config.get("num_train_timesteps", 1000))
        self.shift = float(config.get("flow_shift", 1.0))
        self.order = int(config.get("solver_order", 2))
        # diffusers maps the old names midpoint/heun/logrho to bh2
        self.bh1 = config.get("solver_type", "bh2") == "bh1"
        self.lower_order_final = bool(config.get("lower_order_final", True))
        self.disable_corrector = tuple(config.get("disable_corrector", ()))
        self.final_zero = config.get("final_sigmas_type", "zero") == "zero"
        if not self.lower_order_final and self.final_zero and self.order > 1:
            # the last step to sigma 0 has h = inf: a multistep update divides by zero there
            # (diffusers' own returns NaN or a singular system)
            raise WanError(f"scheduler {self.name}: lower_order_final=false with a final sigma of 0 "
                           "cannot take the last step; use lower_order_final=true")

    def schedule(self, steps: int, shift: float | None = None) -> Schedule:
        shift = self.shift if shift is None else shift
        sigmas = np.linspace(1, 1 / self.train_steps, steps + 1)[:-1]  # float64
        sigmas = _shift(sigmas, shift)
        if abs(sigmas[0] - 1) < 1e-6:  # diffusers: keeps log(alpha) finite at the first step
            sigmas[0] -= 1e-6
        timesteps = (sigmas * self.train_steps).astype(np.int64).astype(f32)
        last = 0.0 if self.final_zero else sigmas[-1]
        return Schedule(timesteps, np.concatenate([sigmas, [last]]).astype(f32))

    @staticmethod
    def _lambda(sigma):
        """log-SNR of a flow sigma as float32: log(1 - sigma) - log(sigma) (+inf at sigma 0)."""
        return _log32(f32(1) - sigma) - _log32(sigma)

    def _coefficients(self, h, order: int):
        """hh, h*phi_1(hh), B(h) and the b vector of the UniP/UniC linear systems (float32)."""
        hh = -h  # data prediction
        with np.errstate(invalid="ignore", divide="ignore"):  # h = inf on the final step to sigma 0
            h_phi_1 = _expm1_32(hh)
            h_phi_k = h_phi_1 / hh - f32(1)
            b_h = hh if self.bh1 else _expm1_32(hh)
            b, factorial = [], 1
            for i in range(1, order + 1):
                b.append(h_phi_k * f32(factorial) / b_h)
                factorial *= i + 1
                h_phi_k = h_phi_k / hh - f32(1) / f32(factorial)
        return h_phi_1, b_h, np.array(b, f32)

    def _differences(self, sig, i: int, h, lam_s0, outputs, m0, order: int, shift_back: int):
        """rks and D1s of diffusers' updates: the history outputs against m0, in log-SNR units."""
        rks, d1s = [], []
        for k in range(1, order):
            lam_sk = self._lambda(sig[i - k - shift_back])
            rk = (lam_sk - lam_s0) / h
            rks.append(rk)
            d1s.append((outputs[-(k + 1)] - m0) / rk)
        return np.array(rks + [f32(1)], f32), d1s

    def _predict(self, sig, i, x, outputs, order):
        """UniP: from x at sigmas[i] to sigmas[i + 1]."""
        m0 = outputs[-1]
        sigma_t, sigma_s0 = sig[i + 1], sig[i]
        alpha_t = f32(1) - sigma_t
        lam_t, lam_s0 = self._lambda(sigma_t), self._lambda(sigma_s0)
        h = lam_t - lam_s0
        rks, d1s = self._differences(sig, i, h, lam_s0, outputs, m0, order, 0)
        h_phi_1, b_h, b = self._coefficients(h, order)
        x_t = (sigma_t / sigma_s0) * x - (alpha_t * h_phi_1) * m0
        if d1s:
            if order == 2:
                rhos = np.array([0.5], f32)
            else:
                R = np.stack([rks ** k for k in range(order)])  # (order, order)
                rhos = np.linalg.solve(R[:-1, :-1], b[:-1]).astype(f32)
            res = sum(r * d for r, d in zip(rhos, d1s))
            x_t = x_t - (alpha_t * b_h) * res
        return x_t.astype(f32, copy=False)

    def _correct(self, sig, i, last_sample, x, model_t, outputs, order):
        """UniC: correct the sample predicted into sigmas[i], now that its output is known."""
        m0 = outputs[-1]
        sigma_t, sigma_s0 = sig[i], sig[i - 1]
        alpha_t = f32(1) - sigma_t
        lam_t, lam_s0 = self._lambda(sigma_t), self._lambda(sigma_s0)
        h = lam_t - lam_s0
        rks, d1s = self._differences(sig, i, h, lam_s0, outputs, m0, order, 1)
        h_phi_1, b_h, b = self._coefficients(h, order)
        if order == 1:
            rhos = np.array([0.5], f32)
        else:
            R = np.stack([rks ** k for k in range(order)])
            rhos = np.linalg.solve(R, b).astype(f32)
        x_t = (sigma_t / sigma_s0) * last_sample - (alpha_t * h_phi_1) * m0
        res = sum(r * d for r, d in zip(rhos[:-1], d1s)) if d1s else 0
        d1_t = model_t - m0
        return (x_t - (alpha_t * b_h) * (res + rhos[-1] * d1_t)).astype(f32, copy=False)

    def step(self, schedule: Schedule, i: int, v: np.ndarray, x: np.ndarray,
             state: UniPCState | None) -> tuple[np.ndarray, UniPCState]:
        state = state or UniPCState()
        sig = schedule.sigmas
        x0 = x - sig[i] * v  # flow prediction -> data prediction
        if i > 0 and (i - 1) not in self.disable_corrector and state.last_sample is not None:
            x = self._correct(sig, i, state.last_sample, x, x0, state.outputs, state.order)
        outputs = (*state.outputs, x0)[-self.order:]
        steps = len(schedule.timesteps)
        order = min(self.order, steps - i) if self.lower_order_final else self.order
        order = min(order, state.warmed + 1)
        x_next = self._predict(sig, i, x, outputs, order)
        return x_next, UniPCState(outputs, x, order, min(state.warmed + 1, self.order))


class FlowMatchEuler:
    """diffusers' FlowMatchEulerDiscreteScheduler (deterministic, static shift)."""

    name = "FlowMatchEulerDiscreteScheduler"

    def __init__(self, config: dict):
        _check(config, {
            "use_dynamic_shifting": lambda v: not v, "invert_sigmas": lambda v: not v,
            "shift_terminal": lambda v: not v, "use_karras_sigmas": lambda v: not v,
            "use_exponential_sigmas": lambda v: not v, "use_beta_sigmas": lambda v: not v,
            "stochastic_sampling": lambda v: not v,
        }, self.name)
        self.train_steps = int(config.get("num_train_timesteps", 1000))
        self.shift = float(config.get("shift", 1.0))

    def schedule(self, steps: int, shift: float | None = None) -> Schedule:
        shift = self.shift if shift is None else shift
        # diffusers builds its range from the training sigmas shifted once (in float32), then
        # shifts the interpolated sigmas again: sigma_min is shifted twice. Kept, for equality.
        train = _shift(np.linspace(1, self.train_steps, self.train_steps, dtype=f32)[::-1] / f32(self.train_steps),
                       shift)
        sigma_min, sigma_max = float(train[-1]), float(train[0])
        t = np.linspace(sigma_max * self.train_steps, sigma_min * self.train_steps, steps)
        sigmas = _shift(t / self.train_steps, shift).astype(f32)
        return Schedule(sigmas * f32(self.train_steps), np.concatenate([sigmas, [f32(0)]]))

    def step(self, schedule: Schedule, i: int, v: np.ndarray, x: np.ndarray, state=None):
        dt = schedule.sigmas[i + 1] - schedule.sigmas[i]
        return (x + dt * v).astype(f32, copy=False), None


SCHEDULERS = {cls.name: cls for cls in (FlowUniPC, FlowMatchEuler)}
# `wan-run --scheduler`: swap the checkpoint's scheduler as diffusers users do
# (`pipe.scheduler = UniPCMultistepScheduler.from_config(...)`); the other one gets the settings
# Wan's releases use (the shift is the request's either way).
SHORT_NAMES = {"unipc": FlowUniPC.name, "euler": FlowMatchEuler.name}
RELEASE_CONFIGS = {
    FlowUniPC.name: {"_class_name": FlowUniPC.name, "prediction_type": "flow_prediction",
                     "use_flow_sigmas": True, "solver_order": 2, "num_train_timesteps": 1000},
    FlowMatchEuler.name: {"_class_name": FlowMatchEuler.name, "num_train_timesteps": 1000},
}


def with_override(config: dict, short_name: str | None) -> dict:
    """The checkpoint's scheduler config, or the named scheduler's release config instead."""
    if short_name is None or SHORT_NAMES.get(short_name) == config.get("_class_name"):
        return config
    if short_name not in SHORT_NAMES:
        raise WanError(f"scheduler {short_name!r} is not allowed: use one of {', '.join(SHORT_NAMES)}")
    return RELEASE_CONFIGS[SHORT_NAMES[short_name]]


def from_config(config: dict) -> FlowUniPC | FlowMatchEuler:
    """The scheduler a `scheduler_config.json` names, or a one-line WanError."""
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name not in SCHEDULERS:
        raise WanError(f"scheduler {name!r} is not supported: the runtime runs {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name](config)
