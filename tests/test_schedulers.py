"""The numpy ports of the Wan schedulers against diffusers' own, step for step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime.errors import WanError
from runtime.schedulers import from_config

UNIPC = {"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction",
         "use_flow_sigmas": True, "flow_shift": 3.0}
CONFIGS = {
    "unipc wan2.1 480p": UNIPC,
    "unipc wan2.2 5b": {**UNIPC, "flow_shift": 5.0},
    "unipc order 3": {**UNIPC, "solver_order": 3},
    "unipc order 1": {**UNIPC, "solver_order": 1},
    "unipc bh1": {**UNIPC, "solver_type": "bh1"},
    "unipc corrector off at 1": {**UNIPC, "disable_corrector": [1]},
    "unipc sigma_min final": {**UNIPC, "final_sigmas_type": "sigma_min"},
    "euler shift 7 (diffusers' Wan test)": {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 7.0},
    "euler shift 5": {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 5.0},
}


def diffusers_scheduler(config: dict):
    import diffusers

    cls = getattr(diffusers, config["_class_name"])
    return cls.from_config({k: v for k, v in config.items() if k != "_class_name"})


@pytest.mark.parametrize("steps", [1, 2, 7, 50])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_step_equals_diffusers(name, steps):
    """Same model outputs fed to both, each keeping its own history: every timestep and every
    step's sample agree to 5e-5 (relative to the sample's scale). Measured at most 1.95e-5 (UniPC
    order 3, 50 steps, on an AMD EPYC host; earlier CI hosts stayed within 1e-5): diffusers
    solves UniPC's order-3 system in float32 with torch.linalg.solve, whose rounding follows the
    CPU's kernels, and the error is carried through 50 steps."""
    config = CONFIGS[name]
    ref = diffusers_scheduler(config)
    ref.set_timesteps(steps)
    ours = from_config(config)
    schedule = ours.schedule(steps)
    np.testing.assert_array_equal(schedule.timesteps, ref.timesteps.numpy().astype(np.float32))
    np.testing.assert_allclose(schedule.sigmas, ref.sigmas.numpy(), rtol=0, atol=1e-7)
    rng = np.random.default_rng(steps)
    x = rng.standard_normal((1, 4, 3, 4, 6), dtype=np.float32)
    x_ref, state, worst = torch.from_numpy(x.copy()), None, 0.0
    for i, t in enumerate(ref.timesteps):
        v = (rng.standard_normal(x.shape, dtype=np.float32) + 0.3 * x).astype(np.float32)  # a velocity-like output
        x_ref = ref.step(torch.from_numpy(v), t, x_ref, return_dict=False)[0]
        x, state = ours.step(schedule, i, v, x, state)
        assert x.dtype == np.float32 and np.isfinite(x).all()
        worst = max(worst, float(np.abs(x - x_ref.numpy()).max() / max(1.0, np.abs(x_ref.numpy()).max())))
    assert worst <= 5e-5, worst


@pytest.mark.parametrize("config, needle", [
    ({"_class_name": "DDIMScheduler"}, "scheduler 'DDIMScheduler' is not supported"),
    ({**UNIPC, "prediction_type": "epsilon"}, "prediction_type='epsilon' is not supported"),
    ({**UNIPC, "use_karras_sigmas": True}, "use_karras_sigmas=True"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ({**UNIPC, "lower_order_final": False}, "cannot take the last step"),
    ([1, 2], "scheduler None is not supported"),
])
def test_unported_settings_are_refused(config, needle):
    with pytest.raises(WanError, match=needle):
        from_config(config)


def test_shift_override():
    """--shift replaces the checkpoint's flow_shift (as diffusers' from_config(..., flow_shift=))."""
    ours = from_config(UNIPC).schedule(10, shift=5.0)
    ref = diffusers_scheduler({**UNIPC, "flow_shift": 5.0})
    ref.set_timesteps(10)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy().astype(np.float32))
