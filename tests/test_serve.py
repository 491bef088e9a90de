"""Serving: `wan-serve repo` / `start` and `wan-run --server`, against a real Triton server.

The servers are the tritonserver the nvidia-pytriton wheel bundles (Python backend only), run
from the serving environment (conftest `serving_env`) on 127.0.0.1 with free ports, and stopped
by the tests or at the end of the session. Request loops are bounded.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import yaml
from PIL import Image

from runtime.errors import WanError
from runtime.job import Options, prepare
from runtime.pipeline import Pipeline
from serve.client import RemoteJob
from serve.repository import RepoSettings, write_repository
from serve.server import tree_rss_mb
from tests.conftest import REPO_ROOT, cli_argv
from tests.conftest import run_cli as run

STEPS = 6  # short videos: the tiny model's step takes milliseconds


@pytest.fixture(scope="module")
def ref_png(tmp_path_factory, reference_image):
    path = tmp_path_factory.mktemp("serve-img") / "ref.png"
    Image.fromarray(reference_image).resize((96, 80)).save(path)
    return path


@pytest.fixture(scope="module")
def seed_repo(tiny_dir, tmp_path_factory):
    return write_repository(tiny_dir, tmp_path_factory.mktemp("serve") / "repo")


@pytest.fixture(scope="module")
def server(triton, seed_repo):
    s = triton(seed_repo, name="seed")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local_pipe(tiny_dir):
    return Pipeline.from_dir(tiny_dir)


def local_frames(pipe, opts: Options) -> np.ndarray:
    return np.concatenate(list(prepare(pipe, opts).chunks()))


def remote_frames(url: str, opts: Options, on_step=None) -> np.ndarray:
    job = RemoteJob(url, opts)
    try:
        return np.concatenate(list(job.chunks(on_step)))
    finally:
        job.close()


def metric(server, name: str, model: str) -> float:
    """A Triton counter of one model, read from the metrics endpoint (0 before its first request)."""
    return sum(float(x.split()[-1]) for x in server.metrics().splitlines()
               if x.startswith(name + "{") and f'model="{model}"' in x)


def remote_error(url: str, opts: Options) -> str:
    with pytest.raises(WanError) as info:
        remote_frames(url, opts)
    return str(info.value)


# --- the repository ----------------------------------------------------------------------------


def test_repository_layout(seed_repo, tiny_dir):
    marker = json.loads((seed_repo / "wan-serve.json").read_text())
    assert sorted(marker["models"]) == sorted(["wan", *json.loads((tiny_dir / "manifest.json").read_text())["stages"]])
    dit = (seed_repo / "dit" / "config.pbtxt").read_text()
    assert 'backend: "python"' in dit and "dynamic_batching" in dit
    assert "max_batch_size: 8" in dit  # the B the graphs were checked for (tiny: up to 8)
    assert 'name: "timestep" data_type: TYPE_FP32 dims: [1]' in dit  # (B,) travels as (B, 1)
    decoder = (seed_repo / "vae_decoder_step" / "config.pbtxt").read_text()
    assert "max_batch_size: 0" in decoder and "dynamic_batching" not in decoder
    wan = (seed_repo / "wan" / "config.pbtxt").read_text()
    assert "decoupled: true" in wan and "count: 4" in wan
    stage = json.loads((seed_repo / "dit" / "1" / "stage.json").read_text())
    assert stage["batched"] and not stage["spinning"] and stage["graph"] == "dit.ort.onnx"
    # hard links, not copies: the repository costs no disk
    assert (seed_repo / "dit" / "1" / "dit.ort.onnx").samefile(tiny_dir / "onnx" / "fp32" / "dit.ort.onnx")


def test_repository_kinds(tiny_dir, tmp_path):
    ort = write_repository(tiny_dir, tmp_path / "ort", RepoSettings(stage_backend="onnxruntime", instances=2,
                                                                    threads=3, precision="fp16"))
    dit = (ort / "dit" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in dit and 'default_model_filename: "dit.onnx"' in dit
    assert "reshape: { shape: [ ] }" in dit and "KIND_GPU" in dit and "count: 2" in dit
    assert 'key: "intra_op_thread_count" value: { string_value: "3" }' in dit
    assert not (ort / "dit" / "1" / "model.py").exists()
    manifest = json.loads((tiny_dir / "manifest.json").read_text())
    engine = manifest["stages"]["dit"]["artifacts"]["fp32"].get("engine")
    if engine and engine["builder"]["flavour"] == "tensorrt-rtx":  # what this machine can build
        with pytest.raises(WanError, match="TensorRT for RTX, which Triton's tensorrt_plan backend does not load"):
            write_repository(tiny_dir, tmp_path / "trt", RepoSettings(stage_backend="tensorrt"))
        assert not (tmp_path / "trt").exists()
    elif engine:
        trt = write_repository(tiny_dir, tmp_path / "trt", RepoSettings(stage_backend="tensorrt"))
        assert 'platform: "tensorrt_plan"' in (trt / "dit" / "config.pbtxt").read_text()
        assert (trt / "dit" / "1" / "dit.plan").is_file()
    with pytest.raises(WanError, match="max batch 1 is not allowed"):
        write_repository(tiny_dir, tmp_path / "b1", RepoSettings(max_batch=1))


def test_repository_refusals(tiny_dir, tmp_path):
    def refused(*args):
        r = run("wan-serve", "repo", *args)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        return lines[0]

    assert "does not exist" in refused(tmp_path / "nothing", "--out", tmp_path / "r")
    assert "instances 0" in refused(tiny_dir, "--out", tmp_path / "r", "--instances", "0")
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert "already exists (use --force to replace it)" in refused(tiny_dir, "--out", keep)
    assert "not a model repository written by wan-serve" in refused(tiny_dir, "--out", keep, "--force")
    assert (keep / "notes.txt").read_text() == "mine"
    # a repository it wrote (parent folders made, as wan-export --out does) is replaced with --force
    out = tmp_path / "new" / "r"
    assert run("wan-serve", "repo", tiny_dir, "--out", out).returncode == 0
    assert run("wan-serve", "repo", tiny_dir, "--out", out, "--force", "--concurrency", "2").returncode == 0
    assert "count: 2" in (out / "wan" / "config.pbtxt").read_text()
    # a tampered artifact directory is refused with the integrity error, and nothing is written
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    graph = bad / "onnx" / "fp32" / "dit.onnx.data"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    assert "does not match its sha256" in refused(bad, "--out", tmp_path / "from-bad")
    assert not (tmp_path / "from-bad").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial left


def test_start_refusals(tmp_path, serving_env, seed_repo):
    def refused(*args):
        r = subprocess.run([str(serving_env / "wan-serve"), "start", *map(str, args)], capture_output=True, text=True)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        return r.stderr

    assert "not a model repository written by wan-serve" in refused(tmp_path)
    assert "ports must differ" in refused(seed_repo, "--grpc-port", 9000, "--http-port", 9000)
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:  # this interpreter's numpy would be misread by the stub
        assert "misreads numpy 2 arrays" in refused(seed_repo, "--python", sys.executable)


# --- one server: parity, health, refusals ------------------------------------------------------


def test_health_ready_and_metrics(server):
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/wan/ready", "/v2/models/dit/ready"):
        assert server.http(path)[0] == 200, path
    status, body = server.http("/v2/models/wan/config")
    assert status == 200 and json.loads(body)["model_transaction_policy"]["decoupled"]
    assert "nv_inference_request_success" in server.metrics()


def test_remote_video_is_the_local_one(server, local_pipe, ref_png):
    steps = []
    for opts in (Options(image=str(ref_png), steps=STEPS, seed=3),
                 Options(image=str(ref_png), steps=STEPS, frames=5, move="0.2,0.1", turn=20.0, guidance=3.0),
                 Options(image=str(ref_png), steps=STEPS, seed=3, cache="teacache:10")):
        remote = remote_frames(server.grpc_url, opts, on_step=lambda i, s: steps.append(i))
        np.testing.assert_array_equal(remote, local_frames(local_pipe, opts))  # identical, not close
    assert steps == [*range(STEPS)] * 3  # one progress event per step, reused steps too


def test_wan_run_server_cli(server, tiny_dir, ref_png, tmp_path):
    """wan-run --server writes the frames wan-run writes locally; refusals are the same line."""
    args = ["--image", ref_png, "--steps", STEPS, "--seed", 5]
    r = run("wan-run", "--server", server.grpc_url, *args, "-o", tmp_path / "remote")
    assert r.returncode == 0, r.stderr
    assert "denoising" in r.stderr and "DiT per step" in r.stdout
    assert run("wan-run", tiny_dir, *args, "-o", tmp_path / "local").returncode == 0
    for name in sorted(p.name for p in (tmp_path / "local").iterdir()):
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "remote" / name).read_bytes(), name
    for bad in (["--steps", 0], ["--prompt", "a fox"], ["--move", "0.4,-0.4"]):
        here = run("wan-run", tiny_dir, "--image", ref_png, *bad, "-o", tmp_path / "x.mp4")
        there = run("wan-run", "--server", server.grpc_url, "--image", ref_png, *bad, "-o", tmp_path / "x.mp4")
        assert here.returncode == there.returncode == 2
        assert there.stderr.strip().splitlines() == here.stderr.strip().splitlines(), (here.stderr, there.stderr)
    assert not (tmp_path / "x.mp4").exists()
    for bad, needle in ((["--threads", 1], "--threads does not apply with --server"),
                        ([tiny_dir], "ARTIFACTS does not apply with --server")):
        r = run("wan-run", "--server", server.grpc_url, "--image", ref_png, *bad, "-o", tmp_path / "x.mp4")
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


BAD_REQUESTS = {
    "too many frames": dict(frames=1001), "frames not 4n+1": dict(frames=6), "height not /16": dict(height=100),
    "width too large": dict(width=2048), "zero steps": dict(steps=0), "absurd steps": dict(steps=10**10),
    "nan guidance": dict(guidance=float("nan")), "rescale above 1": dict(guidance_rescale=1.5),
    "inf shift": dict(shift=float("inf")), "tiny shift": dict(shift=1e-300), "negative seed": dict(seed=-1),
    "bad solver": dict(solver="rk4"), "move not two numbers": dict(move="0.3"), "move too far": dict(move="0.4,-0.4"),
    "turn": dict(turn=120.0), "zoom": dict(zoom=3.0), "bend without move": dict(bend=0.1),
    "still and a move": dict(still=True, move="0.2,0"), "a prompt": dict(prompt="a fox"),
    "a scheduler": dict(scheduler="unipc"), "no image": dict(image=None), "string frames": dict(frames="9"),
    "bad cache": dict(cache="teacache:0"),
}


def test_bad_requests_get_the_runtime_line(server, local_pipe, ref_png, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    cases = {**BAD_REQUESTS, "not an image": dict(image=str(not_image))}
    for case, fields in cases.items():
        opts = Options(**{"image": str(ref_png), "steps": 2, **fields})
        with pytest.raises(WanError) as local:
            prepare(local_pipe, opts)
        assert remote_error(server.grpc_url, opts) == str(local.value), case
    # and the server goes on serving
    opts = Options(image=str(ref_png), steps=STEPS)
    np.testing.assert_array_equal(remote_frames(server.grpc_url, opts), local_frames(local_pipe, opts))


def test_malformed_protocol_requests(server):
    """Requests no wan-run sends (other clients): one line each, from the protocol's checks."""
    import tritonclient.grpc as grpcclient

    from serve.client import _reason

    client = grpcclient.InferenceServerClient(server.grpc_url)
    answers = []
    client.start_stream(callback=lambda result, error: answers.append((result, error)))
    for raw in (b"{not json", b"[1, 2]", json.dumps({"colour": "red"}).encode(),
                json.dumps({"output": "avi"}).encode()):
        t = grpcclient.InferInput("request", [len(raw)], "UINT8")
        t.set_data_from_numpy(np.frombuffer(raw, dtype=np.uint8))
        client.async_stream_infer("wan", [t])
    deadline = time.monotonic() + 30
    while len(answers) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    client.stop_stream()
    client.close()
    errors = sorted(_reason(e) for _, e in answers)
    assert len(errors) == 4, answers
    assert any("request is not JSON" in e for e in errors)
    assert any("request must be a JSON object" in e for e in errors)
    assert any("request field 'colour' is not allowed" in e for e in errors)
    assert any("output 'avi' is not allowed" in e for e in errors)


def test_mp4_output(server, ref_png, tmp_path):
    from runtime.media import read_video

    job = RemoteJob(server.grpc_url, Options(image=str(ref_png), steps=2), output="mp4", fps=8)
    try:
        assert list(job.chunks()) == []  # the frames come encoded, in the last response
    finally:
        job.close()
    (tmp_path / "v.mp4").write_bytes(job.video)
    assert read_video(tmp_path / "v.mp4").shape == (9, 64, 64, 3)


# --- load, aborted requests, restarts -----------------------------------------------------------


def test_concurrent_clients(server, local_pipe, ref_png):
    """4 clients x 4 requests at once: every video right, the DiT's steps joined across videos."""
    seeds = range(4)
    expected = {s: local_frames(local_pipe, Options(image=str(ref_png), steps=STEPS, seed=s)) for s in seeds}

    def counts():
        return {k: metric(server, k, "dit") for k in ("nv_inference_request_success", "nv_inference_exec_count")}

    before = counts()
    results, failures = {}, []

    def client(c):
        for k in range(4):
            seed = (c + k) % 4
            try:
                results[(c, k)] = (seed, remote_frames(server.grpc_url, Options(image=str(ref_png), steps=STEPS,
                                                                                 seed=seed)))
            except Exception as exc:  # noqa: BLE001 - collected, reported below
                failures.append(repr(exc))

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not failures and len(results) == 16, failures
    for seed, frames in results.values():
        np.testing.assert_array_equal(frames, expected[seed])
    after = counts()
    requests = after["nv_inference_request_success"] - before["nv_inference_request_success"]
    executions = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
    assert requests == 16 * STEPS
    assert executions < requests  # some steps of different videos ran as one DiT call


def test_aborted_requests_do_not_wedge_or_leak(server, local_pipe, ref_png):
    """Clients that go away mid-generation: the server stops those videos, holds its memory
    steady and serves the next request."""
    pid = server.server_pid()
    assert pid is not None
    long = Options(image=str(ref_png), steps=400)

    def dit_requests():
        return metric(server, "nv_inference_request_success", "dit")

    class Gone(Exception):
        pass

    def leave(i, seconds):
        raise Gone

    def abort_once():
        job = RemoteJob(server.grpc_url, long)
        try:
            next(job.chunks(leave))  # the first step's progress arrives: the client goes away
        except Gone:
            pass
        job.close()  # cancels the stream

    for _ in range(3):
        abort_once()
    time.sleep(1.0)
    rss0, count0 = tree_rss_mb(pid), dit_requests()
    for _ in range(15):
        abort_once()
    # clients killed outright: no goodbye at all
    script = ("import sys; from serve.client import RemoteJob; from runtime.job import Options; "
              f"j = RemoteJob(sys.argv[1], Options(image={str(ref_png)!r}, steps=400)); "
              "import time; next(j.chunks(lambda i, s: (print('step', flush=True), time.sleep(60))))")
    ran = dit_requests() - count0
    assert ran < 15 * 400 / 4, ran  # the cancelled videos stopped early (they had 6,000 steps to run)
    import select

    for _ in range(3):
        p = subprocess.Popen([sys.executable, "-c", script, server.grpc_url], stdout=subprocess.PIPE, text=True)
        assert select.select([p.stdout], [], [], 60)[0] and p.stdout.readline().startswith("step")
        p.send_signal(signal.SIGKILL)
        p.wait()
        # the server notices the dead stream at its next send; on a loaded host that can take a
        # while, so wait (up to 30 s) for a second without DiT calls (a running video makes ~100)
        deadline, settled = time.monotonic() + 30, None
        while time.monotonic() < deadline and dit_requests() != settled:
            settled = dit_requests()
            time.sleep(1.0)
        assert dit_requests() == settled, "a killed client's video kept running"
    time.sleep(1.0)
    grown = tree_rss_mb(pid) - rss0
    assert grown < 40, f"server RSS grew {grown:.1f} MB over 18 aborted requests"
    opts = Options(image=str(ref_png), steps=STEPS, seed=9)
    np.testing.assert_array_equal(remote_frames(server.grpc_url, opts), local_frames(local_pipe, opts))


def test_killed_server_restarts_and_tampered_repository_is_refused(triton, tiny_dir, local_pipe, ref_png, tmp_path):
    artifacts = tmp_path / "artifacts"
    shutil.copytree(tiny_dir, artifacts)
    repo = write_repository(artifacts, tmp_path / "repo", RepoSettings(concurrency=1))
    opts = Options(image=str(ref_png), steps=STEPS, seed=2)
    expected = local_frames(local_pipe, opts)
    first = triton(repo, name="restart")
    np.testing.assert_array_equal(remote_frames(first.grpc_url, opts), expected)
    ports = (first.grpc_port, first.http_port, first.metrics_port)
    first.kill()  # SIGKILL to the whole group: server and model stubs
    again = triton(repo, ports, name="restarted")
    np.testing.assert_array_equal(remote_frames(again.grpc_url, opts), expected)
    assert again.stop() == 0  # SIGTERM: a clean shutdown
    # a byte changed in a graph after the repository was written: the load fails, saying which file
    graph = repo / "dit" / "1" / "dit.ort.onnx.data"
    data = bytearray(graph.read_bytes())
    data[len(data) // 3] ^= 0x01
    graph.write_bytes(bytes(data))
    with pytest.raises(WanError, match="exited with code"):
        triton(repo, name="tampered")
    text = triton.started[-1].log_path.read_text(errors="replace")
    assert "does not match its sha256" in text and "dit.ort.onnx.data" in text


def test_text_kv_build_through_the_server(triton, exported, ref_png, tmp_path):
    """The seed family's --text-kv build (the CLI's full-attention int8 one): its dit_context stage
    is a Triton model too, called once per video; the frames are the local run's."""
    artifacts = exported("full")
    repo = write_repository(artifacts, tmp_path / "repo", RepoSettings(concurrency=1, precision="int8"))
    assert (repo / "dit_context" / "config.pbtxt").is_file()
    opts = Options(image=str(ref_png), steps=STEPS, seed=4, move="0.2,0.1")
    expected = local_frames(Pipeline.from_dir(artifacts, precision="int8"), opts)
    server = triton(repo, name="seed-kv")
    try:
        np.testing.assert_array_equal(remote_frames(server.grpc_url, opts), expected)
        calls = [metric(server, "nv_inference_request_success", m) for m in ("dit_context", "dit")]
        assert calls == [1, STEPS]
    finally:
        server.stop()


# --- the Wan family through the server ------------------------------------------------------------


def test_wan_family_through_the_server(triton, wan_artifacts, tmp_path):
    """A released-model pipeline (tiny TI2V-5B, text + first frame): the same frames as local."""
    artifacts = wan_artifacts("wan2.2")
    repo = write_repository(artifacts, tmp_path / "repo", RepoSettings(concurrency=1))
    image = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(image)
    opts = Options(prompt="a cat turns its head", image=str(image), steps=3, seed=1)
    expected = local_frames(Pipeline.from_dir(artifacts), opts)
    server = triton(repo, name="wan")
    try:
        np.testing.assert_array_equal(remote_frames(server.grpc_url, opts), expected)
        line = remote_error(server.grpc_url, Options(prompt="x", image=str(image), move="0.1,0"))
        assert line == "--move does not apply to these artifacts: they hold a released Wan model"
    finally:
        server.stop()


# --- scale-out on paper -------------------------------------------------------------------------


def test_kubernetes_manifest_is_well_formed():
    """examples/kubernetes/wan-serve.yaml: the fields kubectl apply --dry-run=client checks
    (apiVersion, kind, metadata.name per object), selectors that match, probes on Triton's ports."""
    docs = [d for d in yaml.safe_load_all((REPO_ROOT / "examples" / "kubernetes" / "wan-serve.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    expected_api = {"Deployment": "apps/v1", "Service": "v1", "HorizontalPodAutoscaler": "autoscaling/v2"}
    for d in docs:
        assert d["apiVersion"] == expected_api[d["kind"]] and d["metadata"]["name"]
    dep, svc, hpa = kinds["Deployment"], kinds["Service"], kinds["HorizontalPodAutoscaler"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert set(ports) == {"grpc", "http", "metrics"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["readinessProbe"]["httpGet"]["port"] in (ports["http"], "http")
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1  # one server per GPU
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports) | set(ports.values())
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", dep["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert "tritonserver" in " ".join(map(str, container.get("command", []) + container.get("args", [])))


def test_serve_help():
    for args in (["--help"], ["repo", "--help"], ["start", "--help"]):
        r = subprocess.run(cli_argv("wan-serve", *args), capture_output=True, text=True)
        assert r.returncode == 0 and "Examples" in r.stdout, r.stderr
