"""How `wan-export --model` scales: export time and peak memory on a Wan2.1-1.3B-shaped transformer.

    python -m bench.wan_scale --out bench-results/wan-scale [--layers 2]

Builds a diffusers-layout folder with random weights: the 1.3B release's transformer shape (dim
1536 = 12 heads x 128, ffn 8960, text_dim 4096) truncated to `--layers` of its 30 layers, a
Wan2.1 VAE at reduced width and a 2-layer UMT5 with d_model 4096 (the released text encoder's
width, so the transformer's text projection is real size). Then runs `wan-export --model` in a
fresh process and reads its peak RSS from the kernel (ru_maxrss of the child), against the fp32
size of the weights it exports. Writes `wan_scale.json` beside a printed summary.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import click


def wide_transformer(layers: int, seed: int = 0):
    """The Wan2.1-1.3B transformer's shape, `layers` of its 30, random weights."""
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                                 in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                                 num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads")


def make_folder(out: Path, layers: int, experts: int = 1) -> dict:
    """A pipeline folder at Wan width; `experts=2`: an A14B-style pair (boundary_ratio 0.875)."""
    import torch
    from diffusers import AutoencoderKLWan, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    from tests.wan_tiny import tokenizer, unipc

    transformer = wide_transformer(layers)
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=32, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    text = UMT5EncoderModel(UMT5Config(vocab_size=128, d_model=4096, d_kv=64, d_ff=256, num_layers=2,
                                       num_heads=4, feed_forward_proj="gated-gelu")).eval()
    two = {"transformer_2": wide_transformer(layers, seed=1), "boundary_ratio": 0.875} if experts == 2 else {}
    WanPipeline(tokenizer=tokenizer(), text_encoder=text, vae=vae, transformer=transformer,
                scheduler=unipc(), **two).save_pretrained(out)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"transformer_params": count(transformer), "vae_params": count(vae), "text_encoder_params": count(text)}


# Printed by the measured process itself as it exits: its own high-water RSS (VmHWM is per
# address space and starts afresh at exec). The kernel's ru_maxrss of a child is not: it counts
# the parent's RSS at fork, which for these benches (torch, the model just built) can exceed the
# child's own.
PEAK_HOOK = ("import atexit, sys; atexit.register(lambda: print('peak_kb', next(int(l.split()[1]) for l in "
             "open('/proc/self/status') if l.startswith('VmHWM')), file=sys.stderr)); ")


def child_peak(code: str, args: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """(seconds, its own peak RSS in MB, result) of `python -c code args...` in a fresh process."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", PEAK_HOOK + code, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    peak = [int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith("peak_kb ")]
    if not peak:
        raise SystemExit(f"no peak reported (exit {r.returncode}): {r.stderr[-2000:]}")
    return seconds, peak[-1] / 1024, r


@click.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the model, the "
              "artifacts and wan_scale.json.")
@click.option("--layers", type=click.IntRange(1, 30), default=2, show_default=True,
              help="Transformer layers of the 30 the release has.")
def main(out: Path, layers: int):
    """Export time and peak RSS of `wan-export --model` on a Wan2.1-1.3B-shaped transformer."""
    out.mkdir(parents=True, exist_ok=True)
    folder = out / "model"
    params = make_folder(folder, layers)
    code = "import sys; from export.cli import entry_point; sys.argv[0] = 'wan-export'; entry_point()"
    seconds, peak_mb, r = child_peak(code, ["--model", str(folder), "--out", str(out / "artifacts"), "--force"])
    if r.returncode != 0:
        raise SystemExit(r.stderr[-2000:])
    largest = max(params.values()) * 4 / 2**20
    # What the export's process holds before any weight: its imports (torch, diffusers, ONNX ...).
    imports = subprocess.run([sys.executable, "-c", "import export.wan.build, export.cli, diffusers, transformers; "
                              "print(next(int(l.split()[1]) for l in open('/proc/self/status') "
                              "if l.startswith('VmHWM')))"], capture_output=True, text=True, check=True)
    baseline = int(imports.stdout.split()[-1]) / 1024
    record = {**params, "layers": layers, "export_s": round(seconds, 1), "peak_rss_mb": round(peak_mb),
              "imports_rss_mb": round(baseline), "largest_component_fp32_mb": round(largest),
              "peak_over_largest": round(peak_mb / largest, 2),
              "peak_above_imports_over_largest": round((peak_mb - baseline) / largest, 2),
              "stage_log": [line for line in r.stderr.splitlines() if "max abs err" in line]}
    (out / "wan_scale.json").write_text(json.dumps(record, indent=2))
    click.echo(json.dumps({k: v for k, v in record.items() if k != "stage_log"}, indent=2))
    for line in record["stage_log"]:
        click.echo(line)


if __name__ == "__main__":
    main()
