"""StageSpec: the one source of shapes."""

from __future__ import annotations

import numpy as np
import pytest

from export.config import PRESETS
from runtime.stages import Dim, StageSpec, stage_specs


@pytest.mark.parametrize("text", ["3", "F", "2*Hp", "4*F-3", "16*Wp", "B"])
def test_dim_round_trip(text):
    assert str(Dim.parse(text)) == text


def test_dim_solve():
    d = Dim.parse("4*F-3")
    assert d.size({"F": 5}) == 17
    assert d.solve(17) == 5 and d.solve(16) is None
    assert Dim.fixed(3).solve(3) is None


def test_specs_follow_geometry():
    cfg = PRESETS["small"]
    specs = stage_specs(cfg.geometry)
    env = cfg.geometry.env(1, 17, 128, 96)
    assert env == {"B": 1, "F": 5, "Hp": 8, "Wp": 6}
    assert specs["vae_encoder"].inputs[0].shape(env) == (1, 3, 17, 128, 96)
    assert specs["vae_encoder"].outputs[0].shape(env) == (1, 16, 5, 16, 12)
    assert specs["dit"].inputs[2].shape(env) == (1, 16, 1, 16, 12)
    assert specs["vae_decoder"].outputs[0].shape(env) == (1, 3, 17, 128, 96)
    assert specs["vae_encoder"].dynamic_axes()["video"] == {0: "B", 2: "4*F-3", 3: "16*Hp", 4: "16*Wp"}


def test_batch_is_what_the_runtime_sends():
    """`batch` (the engines' profile): both CFG branches go to the DiT (and its context) together."""
    specs = stage_specs(PRESETS["tiny"].geometry, text_kv=(2, 32))
    assert {n: s.batch for n, s in specs.items()} == {"vae_encoder": 1, "dit_context": 2, "dit": 2, "vae_decoder": 1}
    d = specs["dit"].to_dict()
    assert StageSpec.from_dict("dit", d) == specs["dit"]
    del d["batch"]  # a manifest written before the field: one item a call
    assert StageSpec.from_dict("dit", d).batch == 1


def test_bind_checks_consistency():
    spec = stage_specs(PRESETS["tiny"].geometry)["dit"]
    good = spec.sample_inputs({"B": 2, "F": 3, "Hp": 2, "Wp": 3})
    assert spec.bind(good) == {"B": 2, "F": 3, "Hp": 2, "Wp": 3}
    bad = dict(good, ref_latent=good["ref_latent"][:, :, :, :2])  # height disagrees with latent
    with pytest.raises(ValueError, match="ref_latent"):
        spec.bind(bad)
    with pytest.raises(ValueError, match="float32"):
        spec.bind(dict(good, timestep=good["timestep"].astype(np.float64)))


def test_sample_inputs_respect_value_range():
    spec = stage_specs(PRESETS["tiny"].geometry)["dit"]
    t = spec.sample_inputs({"B": 8, "F": 1, "Hp": 1, "Wp": 1})["timestep"]
    assert t.min() >= 0 and t.max() <= 1000
