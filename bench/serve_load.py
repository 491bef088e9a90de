"""Serving under load: a real Triton server over an artifact directory, clients over gRPC.

    python -m bench.serve_load --artifacts artifacts/small --out bench-results/serve

For each server configuration (a repository written by wan-serve repo, a server started on
127.0.0.1 from the serving environment), the same requests are sent by one client in turn and
then by 4 clients at once (4 requests each, different seeds): p50/p95 latency per video,
throughput, and how many DiT requests Triton joined per execution (its metrics). Configurations:
    default       1 DiT instance, the DiT batched across videos, ONNX Runtime not spinning
    no-batching   --max-batch 2: one video's CFG pair per DiT call
    spinning      --spin: ONNX Runtime's spin-waiting pool
    2-instances   two instances of every stage, each with half the cores (not spinning)
    2-instances-spinning
The local runtime (one process, no server) is the baseline. Writes serve.json and serve.md, with
the requests/s per node that analytic FLOPs allow on H100s (`node_estimates`).
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import threading
import time
from pathlib import Path

import click
import numpy as np

log = logging.getLogger("bench")

CONFIGS = {
    "default": {},
    "no-batching": {"max_batch": 2},
    "spinning": {"spinning": True},
    "2-instances": {"instances": 2},
    "2-instances-spinning": {"instances": 2, "spinning": True},
}
H100_BF16_TFLOPS = 989.0  # dense
H100_FP8_TFLOPS = 1979.0
GPUS_PER_NODE = 8
ASSUMED_MFU = 0.4  # of the dense peak, for a large DiT step (attention + GEMMs); an assumption


def percentile(xs, q):
    return float(np.percentile(xs, q)) if xs else None


def load(url: str, opts_for, clients: int, per_client: int) -> dict:
    from serve.client import RemoteJob

    latencies, failures = [], []

    def client(c):
        for k in range(per_client):
            t0 = time.perf_counter()
            try:
                job = RemoteJob(url, opts_for(c * per_client + k))
            except Exception as exc:  # noqa: BLE001 - counted
                failures.append(str(exc))
                continue
            try:
                for _ in job.chunks():
                    pass
                latencies.append(time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001 - counted
                failures.append(str(exc))
            finally:
                job.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if not latencies:
        raise click.ClickException(f"every request failed, e.g. {failures[0]}")
    return {"clients": clients, "requests": clients * per_client, "failures": len(failures),
            "p50_ms": percentile(latencies, 50) * 1000, "p95_ms": percentile(latencies, 95) * 1000,
            "videos_per_s": len(latencies) / wall, "wall_s": wall}


def dit_counts(server) -> dict[str, float]:
    out = {}
    for line in server.metrics().splitlines():
        if line.startswith("nv_inference_") and 'model="dit"' in line:
            out[line.split("{")[0]] = float(line.split()[-1])
    return out


def node_estimates(small_gflop_per_video: float) -> list[dict]:
    """Requests/s per 8-GPU H100 node from analytic FLOPs at an assumed MFU: the small model, and
    Wan2.2-TI2V-5B at 720p (121 frames, 27,280 tokens; full attention, 50 steps, CFG batch 2)."""
    from bench.__main__ import analytic_wan22_5b

    big = next(r for r in analytic_wan22_5b() if r["resolution"] == "720p" and r["scaling"] == "full")
    rows = []
    for model, gflop_video, note in (
            ("small (17x128x128, 20 steps)", small_gflop_per_video, "launch/latency bound in practice, not FLOPs"),
            ("wan2.2-ti2v-5b 720p (121 frames, 50 steps)", big["gflop"] * 50, "DiT only; VAE decode adds ~10%")):
        for precision, tflops in (("bf16", H100_BF16_TFLOPS), ("fp8", H100_FP8_TFLOPS)):
            seconds = gflop_video / (tflops * 1000 * ASSUMED_MFU)
            rows.append({"model": model, "precision": precision, "tflop_per_video": gflop_video / 1000,
                         "s_per_video_per_gpu": seconds, "videos_per_s_per_node": GPUS_PER_NODE / seconds,
                         "assumed_mfu": ASSUMED_MFU, "note": note})
    return rows


@click.command()
@click.option("--artifacts", type=click.Path(path_type=Path), required=True, help="An artifact directory "
              "(wan-export --preset small --out artifacts/small).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for serve.json and serve.md.")
@click.option("--env", "env_bin", type=click.Path(path_type=Path), default=Path(".venv-serve/bin"),
              show_default=True, help="The serving environment's bin (wan-serve with nvidia-pytriton).")
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--image", type=click.Path(path_type=Path), default=Path("examples/reference.png"), show_default=True)
@click.option("--config", "only", multiple=True, type=click.Choice(list(CONFIGS)), help="Run only these.")
def main(artifacts, out, env_bin, steps, image, only):
    """Latency and throughput of a Triton server over ARTIFACTS, per server configuration."""
    from runtime.job import Options, prepare
    from runtime.pipeline import Pipeline
    from serve.repository import RepoSettings, write_repository
    from serve.server import ServerProcess

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out.mkdir(parents=True, exist_ok=True)
    opts_for = lambda i: Options(image=str(image), steps=steps, seed=i)  # noqa: E731
    pipe = Pipeline.from_dir(artifacts)
    local = []
    for i in range(4):
        t0 = time.perf_counter()
        for _ in prepare(pipe, opts_for(i)).chunks():
            pass
        local.append(time.perf_counter() - t0)
    records = [{"config": "local runtime (no server)", "clients": 1, "requests": 4,
                "p50_ms": statistics.median(local) * 1000, "videos_per_s": 4 / sum(local)}]
    log.info("local: %.0f ms per video", records[0]["p50_ms"])
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        for name, changes in CONFIGS.items():
            if only and name not in only:
                continue
            repo = write_repository(artifacts, Path(tmp) / name, RepoSettings(**changes))
            with ServerProcess(repo, env_bin, out / f"server-{name}.log") as server:
                load(server.grpc_url, opts_for, 1, 1)  # warm-up: every model's first call
                for clients, per_client in ((1, 4), (4, 4)):
                    before = dit_counts(server)
                    r = load(server.grpc_url, opts_for, clients, per_client)
                    after = dit_counts(server)
                    calls = after["nv_inference_request_success"] - before["nv_inference_request_success"]
                    execs = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
                    r.update(config=name, settings=changes, dit_requests_per_execution=calls / execs if execs else None)
                    records.append(r)
                    log.info("%-22s %d client(s): p50 %6.0f ms  p95 %6.0f ms  %.2f videos/s  DiT joined %.2f",
                             name, clients, r["p50_ms"], r["p95_ms"], r["videos_per_s"],
                             r["dit_requests_per_execution"] or 0)
    small_gflop = None
    try:
        import torch  # noqa: F401 - the FLOP counter needs the PyTorch model

        from bench.__main__ import small_gflop_per_video
        small_gflop = small_gflop_per_video(steps)
    except ImportError:
        pass
    estimates = node_estimates(small_gflop) if small_gflop else []
    (out / "serve.json").write_text(json.dumps({"records": records, "node_estimates": estimates}, indent=1))
    (out / "serve.md").write_text(markdown(records, estimates))
    click.echo(markdown(records, estimates))


def markdown(records, estimates) -> str:
    lines = ["| server | clients x requests | p50 latency | p95 latency | videos/s | DiT requests per execution |",
             "|---|---|---:|---:|---:|---:|"]
    for r in records:
        joined = f"{r['dit_requests_per_execution']:.2f}" if r.get("dit_requests_per_execution") else ""
        p95 = f"{r['p95_ms']:.0f} ms" if r.get("p95_ms") else ""
        lines.append(f"| {r['config']} | {r['clients']} x {r['requests'] // r['clients']} | {r['p50_ms']:.0f} ms | "
                     f"{p95} | {r['videos_per_s']:.2f} | {joined} |")
    if estimates:
        lines += ["", "| model | precision | TFLOP per video | s per video per GPU | videos/s per 8-GPU node |",
                  "|---|---|---:|---:|---:|"]
        for e in estimates:
            lines.append(f"| {e['model']} | {e['precision']} | {e['tflop_per_video']:.3g} | "
                         f"{e['s_per_video_per_gpu']:.3g} | {e['videos_per_s_per_node']:.3g} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
