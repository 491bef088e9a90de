"""Running Triton Inference Server over a repository `wan-serve repo` wrote.

The server is `tritonserver` from PATH (NVIDIA's Triton container) or else the one the
nvidia-pytriton wheel bundles. The bundled one needs three things this module sets up:
    - a backend directory holding its Python backend with the stub built for this Python
      (`python_backend_stubs/3.X/`), made in a temporary folder per server;
    - LD_LIBRARY_PATH with the wheel's libraries and this Python's LIBDIR: otherwise the stub
      loads the system's libpython and dies (pytriton issue #51);
    - the models' interpreter's folder first on PATH: the stub imports packages (numpy,
      onnxruntime, this project) from the `python` it finds there; PYTHONPATH does not reach it.
That interpreter needs numpy < 2: the 2.51 stub was built against numpy 1.x, and under numpy 2
it hands the models arrays with wrong strides (a 34-byte request read as 34 copies of its first
byte). `--python` points at an environment that has it (docs/serving.md).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import WanError

log = logging.getLogger(__name__)

INSTALL_HINT = ("make a serving environment: python3 -m venv .venv-serve && .venv-serve/bin/pip install "
                "'wan-export[serve]' nvidia-pytriton==0.7.0 (its wheel bundles a tritonserver; it pins numpy<2), "
                "or run in NVIDIA's Triton container")


@dataclass(frozen=True)
class ServerCommand:
    argv: list[str]
    env: dict[str, str]
    backends: Path | None  # a temporary backend directory to remove when the server stops


def bundled_triton() -> Path | None:
    """The folder of the tritonserver that nvidia-pytriton ships, if it is installed."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    return folder if (folder / "bin" / "tritonserver").is_file() else None


PROBE = ("import sys, sysconfig, numpy, importlib.util as u; "
         "print(f'{sys.version_info[0]}.{sys.version_info[1]}', numpy.__version__, "
         "sysconfig.get_config_var('LIBDIR'), u.find_spec('serve') is not None and u.find_spec('onnxruntime') is not None)")


def model_python(python: str | None, bundled: bool) -> tuple[Path, str]:
    """(the interpreter the Python models run in, its LIBDIR), after checking that it can run
    them: wan-export and onnxruntime importable, and for the bundled stub the same Python
    version and numpy < 2."""
    path = Path(python or sys.executable)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise WanError(f"python '{path}' is not an executable file")
    try:
        out = subprocess.run([str(path), "-c", PROBE], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WanError(f"python '{path}' cannot be run: {exc}") from None
    if out.returncode != 0:
        raise WanError(f"python '{path}' lacks numpy ({out.stderr.strip().splitlines()[-1] if out.stderr.strip() else 'no output'})")
    version, numpy_version, libdir, has_runtime = out.stdout.split()
    if has_runtime != "True":
        raise WanError(f"python '{path}' cannot import wan-export's serve package and onnxruntime: install "
                       "wan-export into that environment")
    if bundled:
        here = f"{sys.version_info.major}.{sys.version_info.minor}"
        if version != here:
            raise WanError(f"python '{path}' is Python {version}; the bundled stub is run for Python {here}")
        if int(numpy_version.split(".")[0]) >= 2:
            raise WanError(f"python '{path}' has numpy {numpy_version}: the bundled Triton 2.51's Python stub was "
                           "built for numpy 1.x and misreads numpy 2 arrays; give --python an environment with "
                           "numpy<2 and wan-export (docs/serving.md)")
    return path, libdir


def _stub_env(site: Path, python: Path, libdir: str) -> dict[str, str]:
    env = dict(os.environ)
    libs = [str(site / "nvidia_pytriton.libs"), libdir, env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p)
    env["PATH"] = os.pathsep.join([str(python.parent), env.get("PATH", "")])
    return env


def server_command(repo: Path, host: str, grpc_port: int, http_port: int, metrics_port: int,
                   python: str | None = None, extra: tuple[str, ...] = (), log_verbose: int = 0) -> ServerCommand:
    """The tritonserver command line (and environment) for `repo`; `python`: the interpreter
    whose environment the Python models run in (default: this one)."""
    args = [f"--model-repository={repo}", f"--http-address={host}", f"--http-port={http_port}",
            f"--grpc-address={host}", f"--grpc-port={grpc_port}", f"--metrics-address={host}",
            f"--metrics-port={metrics_port}", "--allow-cpu-metrics=true", "--allow-gpu-metrics=false",
            "--exit-timeout-secs=10", f"--log-verbose={log_verbose}", *extra]
    on_path = shutil.which("tritonserver")
    if on_path is not None:  # NVIDIA's container: its own stub, built for its own Python and numpy
        env = dict(os.environ)
        if python is not None:
            env["PATH"] = os.pathsep.join([str(model_python(python, False)[0].parent), env.get("PATH", "")])
        return ServerCommand([on_path, *args], env, None)
    folder = bundled_triton()
    if folder is None:
        raise WanError(f"no tritonserver on PATH and no bundled one: {INSTALL_HINT}")
    interpreter, libdir = model_python(python, True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = folder / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise WanError(f"the bundled tritonserver has no Python backend stub for Python {version}")
    backends = Path(tempfile.mkdtemp(prefix="wan-serve-backends-"))
    python = backends / "python"
    try:
        shutil.copytree(folder / "backends" / "python", python)
        shutil.copy2(stub, python / stub.name)
    except OSError as exc:
        shutil.rmtree(backends, ignore_errors=True)
        raise WanError(f"cannot prepare the Python backend in '{backends}': {exc}") from None
    return ServerCommand([str(folder / "bin" / "tritonserver"), f"--backend-directory={backends}", *args],
                         _stub_env(folder.parent.parent, interpreter, libdir), backends)


def run_server(cmd: ServerCommand) -> int:
    """Run the server in the foreground until it exits; SIGTERM and SIGINT are passed on to it
    (Triton then refuses new requests, finishes the ones in flight, up to 10 s, and unloads)."""
    stop = []  # a signal that came before the server started

    def forward(signum, frame):
        if proc is None:
            stop.append(signum)
        elif proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    proc = None
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            proc = subprocess.Popen(cmd.argv, env=cmd.env)
        except OSError as exc:
            raise WanError(f"cannot start '{cmd.argv[0]}': {exc.strerror}") from None
        if stop:
            forward(stop[0], None)
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # run_cli's handler may raise it: the server still stops cleanly
                forward(signal.SIGINT, None)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if cmd.backends is not None:
            shutil.rmtree(cmd.backends, ignore_errors=True)


def free_ports(n: int, host: str = "127.0.0.1") -> tuple[int, ...]:
    """`n` different TCP ports nothing listens on now (the OS picks them, all held at once)."""
    import contextlib
    import socket

    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind((host, 0))
        return tuple(s.getsockname()[1] for s in socks)


def children() -> dict[int, list[int]]:
    """Parent pid -> its child pids, from /proc."""
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])  # after "(comm)"
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(entry.name))
    return out


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (the server and its model stubs), MB."""
    tree = children()
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += tree.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


class ServerProcess:
    """`wan-serve start` in the background on 127.0.0.1 with free ports (tests, benchmarks):

        with ServerProcess(repo, env_bin) as server:   # waits until Triton says ready
            RemoteJob(server.grpc_url, opts) ...
    """

    def __init__(self, repo: Path, env_bin: Path, log_path: Path, ports: tuple[int, int, int] | None = None,
                 ready_timeout: float = 120.0):
        self.repo, self.env_bin, self.log_path, self.ready_timeout = repo, Path(env_bin), log_path, ready_timeout
        self.grpc_port, self.http_port, self.metrics_port = ports or free_ports(3)
        self.proc: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def http(self, path: str, port: int | None = None) -> tuple[int, str]:
        """(status, body) of a GET on the HTTP port (or `port`); status 0 when nothing answers."""
        import http.client
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port or self.http_port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except (OSError, http.client.HTTPException):  # not listening yet, or a half-started reply
            return 0, ""

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def start(self) -> "ServerProcess":
        import time

        argv = [str(self.env_bin / "wan-serve"), "start", str(self.repo), "--host", "127.0.0.1",
                "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
                "--metrics-port", str(self.metrics_port)]
        self._log = open(self.log_path, "ab")
        env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
        env["PATH"] = os.pathsep.join([str(self.env_bin), env.get("PATH", "")])
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.close()
                raise WanError(f"wan-serve start exited with code {self.proc.returncode}; log: {self.log_path}")
            # Triton opens its metrics port after the HTTP one: a ready answer alone left a window
            # (seen on a loaded CI host) in which /metrics still refused the connection.
            if self.http("/v2/health/ready")[0] == 200 and self.http("/metrics", self.metrics_port)[0] == 200:
                return self
            time.sleep(0.25)
        self.stop()
        raise WanError(f"the server was not ready after {self.ready_timeout:g} s; log: {self.log_path}")

    def server_pid(self) -> int | None:
        """The tritonserver process (the child of wan-serve start)."""
        return next(iter(children().get(self.proc.pid, [])), None)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, as an orchestrator would; SIGKILL to the whole group if it does not stop."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole group at once: a crash, not a shutdown."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
