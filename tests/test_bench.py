"""The benchmark runs and writes its three files (numbers are checked by reading them, not here)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_smoke(tiny_dir, exported, tmp_path):
    args = [sys.executable, "-m", "bench", "--part", "small", "--preset", "tiny", "--out", tmp_path,
            "--artifacts", tiny_dir, "--runs", "1", "--no-compile", "--rss-frames", "5,9"]
    # the --text-kv rows: the CLI's tiny --text-kv build (full attention; the rows' presence is checked)
    r = subprocess.run([*args, "--kv-artifacts", exported("full")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    records = json.loads((tmp_path / "results.json").read_text())
    timed = {(x["stage"], x["impl"]) for x in records if x.get("median_ms")}
    for stage in ("vae_encoder", "dit", "vae_decoder", "end_to_end"):
        assert (stage, "torch-eager") in timed and (stage, "ort-fp32") in timed
    assert ("vae_decoder", "ort-fp32-stream") in timed
    assert {("dit", "ort-fp32-kv"), ("dit_context", "ort-fp32"), ("end_to_end", "ort-fp32-kv")} <= timed
    rss = [x for x in records if "peak_rss_mb" in x]
    assert {x["frames"] for x in rss} == {5, 9} and all(x["peak_rss_mb"] > 0 for x in rss)
    assert any(x.get("model") == "wan2.2-5b" and x["tokens"] == 27280 for x in records)
    dit = next(x for x in records if x["stage"] == "dit" and x["impl"] == "ort-fp32")
    assert 0 < dit["achieved_gflops"] < dit["peak_gflops"] * 1.5
    assert (tmp_path / "results.md").read_text().startswith("# wan-export benchmark")
    assert (tmp_path / "results.png").stat().st_size > 1000


def test_bench_refusals(tiny_dir, exported, tmp_path):
    """Before anything is built or timed: one usage line each."""
    base = [sys.executable, "-m", "bench", "--part", "small", "--preset", "tiny", "--out", tmp_path / "out"]
    for extra, needle in ((["--kv-artifacts", tiny_dir], "was not built with --text-kv"),
                          (["--kv-artifacts", tmp_path], "--kv-artifacts: "),
                          (["--kv-artifacts", exported("full"), "--no-kv"], "contradict each other"),
                          (["--artifacts", tmp_path / "none"], "does not exist")):
        r = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr[-2000:])
    assert not (tmp_path / "out").exists()
