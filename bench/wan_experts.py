"""What `wan-run --low-memory` saves on a two-expert (Wan2.2 A14B-style) model.

    python -m bench.wan_experts --out bench-results/wan-experts [--layers 2]

Builds an A14B-style folder at Wan2.1-1.3B width (bench/wan_scale.py: dim 1536, ffn 8960, text_dim
4096; `--layers` of 30 per expert, random weights, two differently seeded experts, boundary_ratio
0.875), exports it, then generates the same short video with and without --low-memory, each in a
fresh process, and reads each process's own peak RSS (VmHWM, printed as it exits: bench/wan_scale.py's
`child_peak`). Also the peak of a process that only imports and opens nothing, for the baseline. Writes
`wan_experts.json` beside a printed summary.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from bench.wan_scale import child_peak, make_folder

RUN = "import sys; from runtime.cli import entry_point; sys.argv[0] = 'wan-run'; entry_point()"
EXPORT = "import sys; from export.cli import entry_point; sys.argv[0] = 'wan-export'; entry_point()"


@click.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the model, the "
              "artifacts and wan_experts.json.")
@click.option("--layers", type=click.IntRange(1, 30), default=2, show_default=True,
              help="Transformer layers per expert, of the 30 the 1.3B release has.")
@click.option("--video", default="5x128x128", show_default=True, metavar="FxHxW", help="The generated video.")
def main(out: Path, layers: int, video: str):
    """Peak RSS of wan-run on a two-expert model, with and without --low-memory."""
    out.mkdir(parents=True, exist_ok=True)
    folder, artifacts = out / "model", out / "artifacts"
    if not (artifacts / "manifest.json").exists():
        params = make_folder(folder, layers, experts=2)
        export_s, export_mb, r = child_peak(EXPORT, ["--model", str(folder), "--out", str(artifacts), "--force"])
        if r.returncode != 0:
            raise SystemExit(r.stderr[-2000:])
    else:  # a previous run's export
        params, export_s, export_mb = {}, None, None
    frames, height, width = video.split("x")
    args = [str(artifacts), "--prompt", "a red fox runs through snow", "--frames", frames, "--height", height,
            "--width", width, "--steps", "8", "-o"]
    runs = {}
    for name, extra in (("all loaded", []), ("--low-memory", ["--low-memory"])):
        seconds, peak, r = child_peak(RUN, [*args, str(out / f"{name.strip('-')}.mp4"), "--overwrite", *extra])
        if r.returncode != 0:
            raise SystemExit(r.stderr[-2000:])
        runs[name] = {"seconds": round(seconds, 1), "peak_rss_mb": round(peak),
                      "table": [line for line in r.stdout.splitlines() if " ms" in line]}
    _, baseline, _ = child_peak("import runtime.cli, runtime.wan, onnxruntime", [])
    expert_mb = sum(p.stat().st_size for p in (artifacts / "onnx" / "fp32").glob("dit.onnx*")) / 2**20
    record = {**params, "layers_per_expert": layers, "video": video, "export_s": export_s,
              "export_peak_rss_mb": None if export_mb is None else round(export_mb),
              "expert_graph_mb": round(expert_mb), "runtime_imports_rss_mb": round(baseline), "runs": runs,
              "saved_mb": runs["all loaded"]["peak_rss_mb"] - runs["--low-memory"]["peak_rss_mb"]}
    (out / "wan_experts.json").write_text(json.dumps(record, indent=2))
    click.echo(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
