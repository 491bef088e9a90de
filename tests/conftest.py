"""Shared fixtures: the `tiny` preset exported once per session (factorized and full attention)."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys

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


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """Run a console script (`wan-run ...`, `wan-export ...`) through this interpreter."""
    tool, rest = args[0], args[1:]
    module = {"wan-run": "runtime.cli", "wan-export": "export.cli"}[tool]
    code = f"import sys; from {module} import entry_point; sys.argv[0] = {tool!r}; entry_point()"
    return subprocess.run([sys.executable, "-c", code, *map(str, rest)], capture_output=True,
                          text=True, cwd=cwd, timeout=900)


@pytest.fixture(scope="session")
def cli_export(tmp_path_factory):
    """`wan-export --preset tiny --attention full` run as a user would (into a new folder);
    the full-attention artifacts of the parity tests are this build."""
    out = tmp_path_factory.mktemp("cli") / "new" / "tiny-full"
    return run_cli("wan-export", "--preset", "tiny", "--attention", "full", "--out", out), out


@pytest.fixture(scope="session")
def exported(tmp_path_factory, request):
    """attention -> artifact directory of the tiny preset, built on first use."""
    from export.build import build_artifacts

    logging.getLogger("export").setLevel(logging.WARNING)
    built = {}

    def get(attention: str = "factorized"):
        if attention not in built:
            if attention == "full":
                result, out = request.getfixturevalue("cli_export")
                assert result.returncode == 0, result.stderr
            else:
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
