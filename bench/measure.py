"""Timing, the machine's matmul peak, FLOP counts and peak memory, for the benchmark records."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap
import time
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


def matmul_peak_gflops(n: int = 2048, runs: int = 5) -> float:
    """fp32 matmul throughput through torch: the practical compute ceiling of this machine."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    t = timed(lambda: a @ b, warmup=2, runs=runs)
    return 2 * n**3 / (t["median_ms"] / 1000) / 1e9


def flops(module, *args) -> float:
    """FLOPs of one forward call (matmuls, convolutions, attention), counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args)
    return float(counter.get_total_flops())


def decode_peak_rss_mb(artifacts: str, frames: int, height: int, width: int, stream: bool) -> dict:
    """Peak resident memory of a fresh process that loads the artifacts and decodes a clip
    (its own ru_maxrss, so nothing else in this process counts)."""
    code = textwrap.dedent(f"""
        import json, resource
        import numpy as np
        from runtime import Pipeline
        pipe = Pipeline.from_dir({artifacts!r})
        env = pipe.manifest.geometry.env(1, {frames}, {height}, {width})
        shape = pipe.stages["vae_decoder"].spec.inputs[0].shape(env)
        latent = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for chunk in (pipe.decode_stream(latent) if {stream} else [pipe.decode_video(latent, stream=False)]):
            pass
        print(json.dumps({{"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "base": base}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    # KiB -> MiB; "decode" is what decoding added to the peak of loading the sessions
    return {"peak_rss_mb": rss["peak"] / 1024, "decode_rss_mb": (rss["peak"] - rss["base"]) / 1024}
