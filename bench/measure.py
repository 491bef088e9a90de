"""Timing, the machine's matmul peak, FLOP counts and peak memory, for the benchmark records."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Callable

import numpy as np


def timed(fn: Callable[[], object], warmup: int = 1, runs: int = 5) -> dict:
    """Median and p90 wall-clock milliseconds of `fn` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": float(np.percentile(times, 90)),
            "runs": runs}


def matmul_peak_gflops(sizes: tuple[int, ...] = (1024, 2048, 3072), runs: int = 5) -> float:
    """fp32 matmul throughput through torch: the practical compute ceiling of this machine, the
    best run over a few square sizes (a shared machine's median is its neighbours' load, not the
    ceiling: a 2048-only median read 85-311 GFLOP/s on this host, below what the DiT reached)."""
    import torch

    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(2):  # warm-up
            a @ b
        for _ in range(runs):
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def ort_op_profile(path, feeds: dict, runs: int = 3) -> dict[str, float]:
    """Share of the kernel time each ONNX operator type takes in the graph at `path`, from ONNX
    Runtime's own profiler over `runs` runs (the first, warming up, included: shares barely
    move with it), largest first."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 4
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(tempfile.gettempdir()) / "wan-bench-profile")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, feeds)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + e["dur"]
    total = sum(per_op.values()) or 1.0
    return dict(sorted(((k, v / total) for k, v in per_op.items()), key=lambda kv: -kv[1]))


def flops(module, *args) -> float:
    """FLOPs of one forward call (matmuls, convolutions, attention), counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args)
    return float(counter.get_total_flops())


def decode_peak_rss_mb(artifacts: str, frames: int, height: int, width: int, stream: bool) -> dict:
    """Peak resident memory of a fresh process that loads the artifacts and decodes a clip.

    Read from the kernel's per-process high-water mark (VmHWM), not ru_maxrss: Linux carries
    ru_maxrss across exec, so a child of a large benchmark process would report the parent's
    size. The mark is reset after loading (clear_refs 5), so `decode_rss_mb` is what decoding
    itself adds on top of the loaded sessions."""
    code = textwrap.dedent(f"""
        import json
        import numpy as np
        from runtime import Pipeline
        def hwm_kib():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        pipe = Pipeline.from_dir({artifacts!r})
        env = pipe.manifest.geometry.env(1, {frames}, {height}, {width})
        shape = pipe.stages["vae_decoder"].spec.inputs[0].shape(env)
        latent = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        loaded = hwm_kib()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current RSS
        base = hwm_kib()
        for chunk in (pipe.decode_stream(latent) if {stream} else [pipe.decode_video(latent, stream=False)]):
            pass
        print(json.dumps({{"peak": max(hwm_kib(), loaded), "base": base}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    # KiB -> MiB; "decode" is what decoding added above the RSS after loading
    return {"peak_rss_mb": rss["peak"] / 1024, "decode_rss_mb": (rss["peak"] - rss["base"]) / 1024}
