"""Shared fixtures: the `tiny` preset exported once per session (factorized and full attention)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest

from engines.quality import psnr  # noqa: F401 - re-exported for the tests
from export.config import PRESETS, ModelConfig


def tiny_config(attention: str = "factorized") -> ModelConfig:
    cfg = PRESETS["tiny"]
    return dataclasses.replace(cfg, dit=dataclasses.replace(cfg.dit, attention=attention))


@pytest.fixture(scope="session", params=["factorized", "full"])
def attention(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """attention -> artifact directory of the tiny preset, built on first use."""
    from export.build import build_artifacts

    logging.getLogger("export").setLevel(logging.WARNING)
    built = {}

    def get(attention: str = "factorized"):
        if attention not in built:
            out = tmp_path_factory.mktemp("artifacts") / f"tiny-{attention}"
            build_artifacts(tiny_config(attention), out)
            built[attention] = out
        return built[attention]

    return get


@pytest.fixture(scope="session")
def tiny_dir(exported):
    return exported("factorized")


@pytest.fixture(scope="session")
def reference_image() -> np.ndarray:
    """A 64x64 uint8 image: a bright disc on a coloured background, some texture."""
    yy, xx = np.mgrid[0:64, 0:64]
    img = np.zeros((64, 64, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 60 + xx, 90, 150 - yy
    disc = (yy - 28) ** 2 + (xx - 24) ** 2 < 14**2
    img[disc] = (230, 120, 40)
    return img
