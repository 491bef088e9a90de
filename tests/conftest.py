"""Shared fixtures: the `tiny` preset exported once per session (factorized and full attention)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engines.quality import psnr  # noqa: F401 - re-exported for the tests
from engines.tensorrt import EngineOptions, VideoShape
from export.config import PRESETS, ModelConfig

# CI installs tensorrt-rtx, which builds real engines without a GPU.
HAVE_TRT_BUILDER = any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx"))
ENGINE_SHAPES = EngineOptions(VideoShape(1, 32, 32), VideoShape(9, 64, 64), VideoShape(17, 128, 128))


def tiny_config(attention: str = "factorized") -> ModelConfig:
    cfg = PRESETS["tiny"]
    return dataclasses.replace(cfg, dit=dataclasses.replace(cfg.dit, attention=attention))


@pytest.fixture(scope="session", params=["factorized", "full"])
def attention(request) -> str:
    return request.param


def cli_argv(tool: str, *args) -> list[str]:
    """The command line of a console script (`wan-run`, `wan-export`) run by this interpreter."""
    module = {"wan-run": "runtime.cli", "wan-export": "export.cli", "wan-serve": "serve.cli"}[tool]
    code = f"import sys; from {module} import entry_point; sys.argv[0] = {tool!r}; entry_point()"
    return [sys.executable, "-c", code, *map(str, args)]


def run_cli(*args, cwd=None, **kwargs) -> subprocess.CompletedProcess:
    """Run a console script (`wan-run ...`, `wan-export ...`) to completion."""
    return subprocess.run(cli_argv(*args), capture_output=True, text=True, cwd=cwd, timeout=900, **kwargs)


@pytest.fixture(scope="session")
def cli_export(tmp_path_factory):
    """`wan-export --preset tiny --attention full --text-kv --precision int8` run as a user would
    (into a new folder); the full-attention artifacts of the parity tests are this build, so they
    check the reference K/V computed once per video (the factorized build computes them in the step)."""
    out = tmp_path_factory.mktemp("cli") / "new" / "tiny-full"
    return run_cli("wan-export", "--preset", "tiny", "--attention", "full", "--text-kv", "--precision", "int8",
                   "--out", out), out


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
                # One build serves every test of the factorized tiny model: fp32 graphs, the fp16
                # and int8 ones with their quality report, and TensorRT engines where a builder is
                # installed (exporting fp32 once instead of twice keeps the suite's budget).
                out = tmp_path_factory.mktemp("artifacts") / f"tiny-{attention}"
                build_artifacts(tiny_config(attention), out, precisions=("fp16", "int8"),
                                engines=ENGINE_SHAPES if HAVE_TRT_BUILDER else None)
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


@contextlib.contextmanager
def small_filesystem(path, size: str = "64k", read_only: bool = False):
    """A tmpfs of `size` (or read-only) mounted at `path`: real ENOSPC / EROFS for the writers.
    Skips where this process may not mount (the checks are then only the in-process ones)."""
    path.mkdir()
    opts = f"size={size}" + (",ro" if read_only else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped): what a killed run leaves behind."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def fake_stages(monkeypatch, build_mod, on_export=None):
    """Stand-ins for export + validation, so a test about the writer builds in a second:
    every graph is a few bytes; `on_export(spec)` runs after each is written."""
    def export_stage(module, spec, symbols, path, *rest):
        path.write_bytes(b"x" * 64)
        if on_export is not None:
            on_export(spec)

    monkeypatch.setattr(build_mod, "export_stage", export_stage)
    monkeypatch.setattr(build_mod, "validate_stage", lambda *a, **k: {
        "passed": True, "max_abs": 0.0, "max_rel": 0.0, "tolerance": 1e-4})


# What each tiny export adds to `wan-export --model`: Wan2.1 T2V at fp16/int8 with fused attention, A14B at fp16/int8
# (per-expert calibration), I2V-A14B at fp16 (calibration on images); the others fp32. TensorRT engines (where tensorrt-rtx builds them) for
# Wan2.1 T2V, A14B and Wan2.1 I2V: every kind of stage at every precision. The tiny pipelines share
# their seeded text encoder (and the Wan2.1 ones their VAE), so each export --reuse-s those stages
# from the one before it, as a user exporting several releases would.
# "+kv": the folder before the plus exported with --text-kv (two experts at fp16, with engines;
# CLIP image K/V; int8 of a --text-kv build is measured by python -m bench --part wan).
WAN_ORDER = ("wan2.2", "wan2.1", "a14b", "a14b-i2v", "wan2.1-i2v")
WAN_BUILDS = (*WAN_ORDER, "a14b+kv", "wan2.1-i2v+kv")
WAN_EXPORT_ARGS = {"wan2.1": ["--precision", "fp16,int8", "--fused-attention"], "a14b": ["--precision", "fp16,int8"],
                   "a14b-i2v": ["--precision", "fp16"],  # calibrated on images
                   "a14b+kv": ["--text-kv", "--precision", "fp16"], "wan2.1-i2v+kv": ["--text-kv"]}
WAN_ENGINES = ("wan2.1", "a14b", "wan2.1-i2v", "a14b+kv")


class WanBuilds:
    """The tiny Wan folders and their exports, made in order by one background thread of
    subprocesses (so they overlap with the tests that need none of them; nothing of torch runs in
    the test process's threads). `folder(v)` and `artifacts(v)` wait for theirs."""

    def __init__(self, root):
        import threading

        self.root, self.results, self.errors = root, {}, {}
        self.ready = {**{("folder", v): threading.Event() for v in WAN_ORDER},
                      **{("artifacts", v): threading.Event() for v in WAN_BUILDS}}
        self.proc, self.stopped = None, False
        threading.Thread(target=self._run, daemon=True).start()

    def _call(self, argv: list, **kwargs) -> subprocess.CompletedProcess:
        if self.stopped:
            raise RuntimeError("the session ended")
        self.proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, **kwargs)
        out, err = self.proc.communicate(timeout=900)
        return subprocess.CompletedProcess(argv, self.proc.returncode, out, err)

    def stop(self) -> None:
        """At the session's end: no export left running behind it (a run of a few tests)."""
        self.stopped = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    def _run(self):
        from pathlib import Path

        repo = Path(__file__).resolve().parent.parent
        try:
            code = ("import sys; from pathlib import Path; from tests.wan_tiny import save_pipeline; "
                    "[save_pipeline(Path(sys.argv[1]) / v, v) for v in sys.argv[2:]]")
            r = self._call([sys.executable, "-c", code, self.root / "folders", *WAN_ORDER], cwd=repo)
            for v in WAN_ORDER:
                self.errors[("folder", v)] = None if r.returncode == 0 else r.stderr[-3000:]
                self.ready[("folder", v)].set()
            previous = None
            for v in WAN_BUILDS:
                extra = list(WAN_EXPORT_ARGS.get(v, []))
                if v in WAN_ENGINES and HAVE_TRT_BUILDER:
                    extra += ["--tensorrt", "--min", "1x32x32", "--opt", "9x32x32", "--max", "17x64x64"]
                if previous is not None:
                    extra += ["--reuse", previous]
                out = self.root / "artifacts" / v
                folder = self.root / "folders" / v.split("+")[0]
                r = self._call(cli_argv("wan-export", "--model", folder, "--out", out, *extra))
                self.results[v] = r
                self.errors[("artifacts", v)] = None if r.returncode == 0 else r.stderr[-3000:]
                self.ready[("artifacts", v)].set()
                previous = out if r.returncode == 0 else previous
        except Exception as exc:  # the session ended, or a build timed out
            reason = f"the build thread stopped before this: {exc}"
        else:
            reason = "not built"
        for key, event in self.ready.items():  # nothing is left waiting
            self.errors.setdefault(key, reason)
            event.set()

    def get(self, kind: str, version: str):
        assert version in (WAN_ORDER if kind == "folder" else WAN_BUILDS), version
        assert self.ready[(kind, version)].wait(timeout=1800), f"{kind} {version}: timed out"
        assert self.errors[(kind, version)] is None, self.errors[(kind, version)]
        return self.root / ("folders" if kind == "folder" else "artifacts") / version


@pytest.fixture(scope="session")
def wan_builds(tmp_path_factory):
    builds = WanBuilds(tmp_path_factory.mktemp("wan"))
    yield builds
    builds.stop()


@pytest.fixture(scope="session", autouse=True)
def _start_wan_builds(request):
    """Start the Wan builds with the session when any collected test uses them."""
    if any({"wan_folder", "wan_artifacts"} & set(item.fixturenames) for item in request.session.items):
        request.getfixturevalue("wan_builds")


@pytest.fixture(scope="session")
def wan_folder(wan_builds):
    """version ("wan2.1" T2V, "wan2.2" TI2V-5B, "a14b", "a14b-i2v", "wan2.1-i2v": tests/wan_tiny.py)
    -> a tiny diffusers-layout pipeline folder."""
    return lambda version: wan_builds.get("folder", version)


@pytest.fixture(scope="session")
def wan_artifacts(wan_builds):
    """version -> `wan-export --model FOLDER --out DIR` run as a user would, once per session;
    `.result(version)`: that command's CompletedProcess."""

    def get(version: str):
        return wan_builds.get("artifacts", version)

    get.result = lambda version: wan_builds.results[version]
    return get


# --- serving ----------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def serving_env() -> Path:
    """The `bin` folder of the serving environment: wan-export with nvidia-pytriton (its bundled
    tritonserver; it pins numpy<2, which its Python stub needs). `.ci/run` makes it; made here
    when missing (a minute), or taken from $WAN_SERVE_ENV."""
    env = Path(os.environ.get("WAN_SERVE_ENV", REPO_ROOT / ".venv-serve"))
    if not (env / "bin" / "wan-serve").exists():
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        subprocess.run([str(env / "bin" / "pip"), "install", "--quiet", "-e", f"{REPO_ROOT}[serve]",
                        "nvidia-pytriton==0.7.0"], check=True)
    return env / "bin"


@pytest.fixture(scope="session")
def triton(serving_env, tmp_path_factory):
    """Start servers on 127.0.0.1 (free ports): `triton(repo)` -> a started ServerProcess;
    every one still running is stopped at the end of the session."""
    from serve.server import ServerProcess

    logs = tmp_path_factory.mktemp("triton-logs")
    started = []

    def start(repo, ports=None, name="server"):
        server = ServerProcess(Path(repo), serving_env, logs / f"{name}-{len(started)}.log", ports)
        started.append(server)
        return server.start()

    start.started = started
    yield start
    for server in started:
        if server.proc is not None and server.proc.poll() is None:
            server.stop()
