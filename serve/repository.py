"""`wan-serve repo`: a Triton model repository from an artifact directory.

    REPO/
      wan-serve.json            what made it (Triton reads only the model folders)
      wan/config.pbtxt          the decoupled BLS model (serve/wan_model.py)
      wan/1/model.py            a one-line shim over the installed package
      wan/1/artifacts/          the artifact directory, its files hard-linked (copied across devices)
      <stage>/config.pbtxt      one model per stage: dit, vae_decoder, text_encoder, ...
      <stage>/1/<graph>.onnx    the stage's graph at --precision (+ its .data), or <stage>.plan
      <stage>/1/stage.json      its spec, source paths, sha256 and ONNX Runtime settings

Stage models come in three kinds (`--stage-backend`):
    python       Triton's Python backend running ONNX Runtime (serve/stage_model.py): runs on any
                 Triton, including the one nvidia-pytriton bundles, which has no other backend
    onnxruntime  platform "onnxruntime_onnx": Triton's ONNX Runtime backend (CUDA / TensorRT EPs
                 on GPU nodes, in NVIDIA's Triton container)
    tensorrt     platform "tensorrt_plan": the engines wan-export --tensorrt built
Stages whose every tensor is batch-first (the DiT experts) get Triton's dynamic batcher, so
concurrent videos' denoising steps run as one call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from runtime.errors import WanError
from runtime.files import (absolute, check_writable_dir, clean_stale, commit, environment_error, exists,
                           partial_name, remove)
from runtime.manifest import MANIFEST_NAME, load_manifest, read_manifest_bytes
from runtime.request import whole
from runtime.stages import StageSpec
from serve.protocol import MODEL

log = logging.getLogger(__name__)

STAGE_BACKENDS = ("python", "onnxruntime", "tensorrt")
MARKER = "wan-serve.json"
STAGE_FILE = "stage.json"  # in each stage model's version folder
BATCHED_STAGES = ("dit", "dit_2")  # called once per step per video: worth joining across requests
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
                "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8"}
SHIM = "# written by wan-serve repo: the model is the installed wan-export's\nfrom serve.{} import TritonPythonModel  # noqa: F401\n"


@dataclass(frozen=True)
class RepoSettings:
    """How the repository's models run; defaults suit a CPU server (see docs/serving.md)."""

    precision: str = "fp32"
    stage_backend: str = "python"
    instances: int = 1  # instances of each stage model
    concurrency: int = 4  # videos generated at once (instances of the `wan` model)
    threads: int | None = None  # ONNX Runtime intra-op threads per stage instance (None: the server's
    # cores / instances, counted where it runs)
    spinning: bool = False  # ONNX Runtime's spin-waiting thread pool
    max_batch: int | None = None  # DiT batch across requests (None: the B the graphs were checked for)
    queue_delay_us: int = 2000  # how long the DiT's batcher waits to fill a batch

    def check(self) -> "RepoSettings":
        if self.stage_backend not in STAGE_BACKENDS:
            raise WanError(f"stage backend {self.stage_backend!r} is not allowed: use {', '.join(STAGE_BACKENDS)}")
        whole("instances", self.instances, 1, 64)
        whole("concurrency", self.concurrency, 1, 256)
        if self.threads is not None:
            whole("threads", self.threads, 1, 1024)
        if self.max_batch is not None:  # a guided video is a DiT batch of 2
            whole("max batch", self.max_batch, 2, 1024, "use 2 (no joining: one guided video per DiT call) to 1024")
        whole("queue delay", self.queue_delay_us, 0, 10_000_000)
        return self


def _dims(spec_dims, batched: bool) -> list[int]:
    """Triton dims: -1 for a dynamic axis; a batched model's batch axis is implicit, and a
    batch-only tensor becomes dims [1] (Triton wants at least one)."""
    dims = [-1 if d.symbol is not None else d.offset for d in spec_dims]
    return (dims[1:] or [1]) if batched else dims


def _tensor(t, batched: bool, reshape: bool) -> str:
    dims = _dims(t.dims, batched)
    text = f'{{ name: "{t.name}" data_type: {TRITON_TYPES[t.dtype]} dims: {dims} '
    if reshape and batched and len(t.dims) == 1:
        text += "reshape: { shape: [ ] } "  # the graph's (B,) tensor
    return text + "}"


def _config(name: str, body: list[str]) -> str:
    return "\n".join([f'name: "{name}"', *body]) + "\n"


def batchable(spec: StageSpec) -> bool:
    return all(t.dims and t.dims[0].symbol == "B" for t in spec.inputs + spec.outputs)


def stage_config(spec: StageSpec, settings: RepoSettings, batch: int, graph: str) -> str:
    kind = settings.stage_backend
    batched = batch > 0
    body = {"python": ['backend: "python"'],
            "onnxruntime": ['platform: "onnxruntime_onnx"', f'default_model_filename: "{graph}"'],
            "tensorrt": ['platform: "tensorrt_plan"', f'default_model_filename: "{graph}"']}[kind]
    reshape = kind != "python"  # the Python model reshapes itself
    body.append(f"max_batch_size: {batch}")
    body.append("input [\n  " + ",\n  ".join(_tensor(t, batched, reshape) for t in spec.inputs) + "\n]")
    body.append("output [\n  " + ",\n  ".join(_tensor(t, batched, reshape) for t in spec.outputs) + "\n]")
    device = "KIND_CPU" if kind == "python" else "KIND_GPU"
    body.append(f"instance_group [ {{ count: {settings.instances} kind: {device} }} ]")
    if batched:
        body.append(f"dynamic_batching {{ max_queue_delay_microseconds: {settings.queue_delay_us} }}")
    if kind == "onnxruntime" and settings.threads:  # Triton's ORT backend (else its own default)
        body.append(f'parameters {{ key: "intra_op_thread_count" value: {{ string_value: "{settings.threads}" }} }}')
        body.append('parameters { key: "inter_op_thread_count" value: { string_value: "1" } }')
    return _config(spec.name, body)


def wan_config(settings: RepoSettings) -> str:
    return _config(MODEL, [
        'backend: "python"',
        "max_batch_size: 0",
        "model_transaction_policy { decoupled: true }",  # many responses per request: progress, frames
        "input [\n"
        '  { name: "request" data_type: TYPE_UINT8 dims: [ -1 ] },\n'
        '  { name: "image" data_type: TYPE_UINT8 dims: [ -1 ] optional: true },\n'
        '  { name: "last_image" data_type: TYPE_UINT8 dims: [ -1 ] optional: true }\n]',
        "output [\n"
        '  { name: "event" data_type: TYPE_UINT8 dims: [ -1 ] },\n'
        '  { name: "frames" data_type: TYPE_UINT8 dims: [ -1, -1, -1, 3 ] },\n'
        '  { name: "video" data_type: TYPE_UINT8 dims: [ -1 ] }\n]',
        f"instance_group [ {{ count: {settings.concurrency} kind: KIND_CPU }} ]",
    ])


def link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed: a copy
        shutil.copy2(src, dst)


def stage_files(manifest, name: str, settings: RepoSettings) -> tuple[str, list[str]]:
    """(the graph file's name, every file it needs, relative to the artifact directory)."""
    stage = manifest.stages[name]
    art = stage.artifacts.get(settings.precision)
    if art is None:
        raise WanError(f"stage {name} was not built at {settings.precision} (built: "
                       f"{', '.join(stage.artifacts)}); rebuild with wan-export --precision {settings.precision}")
    if settings.stage_backend == "tensorrt":
        if art.engine is None:
            raise WanError(f"stage {name} has no TensorRT engine at {settings.precision}; build one with "
                           "wan-export --tensorrt, or use --stage-backend onnxruntime")
        builder = art.engine.get("builder", {})
        if builder.get("flavour") == "tensorrt-rtx":
            raise WanError(f"stage {name}'s engine was built by TensorRT for RTX, which Triton's tensorrt_plan "
                           "backend does not load: build the engines with the full tensorrt of the Triton "
                           "container's version, on the GPU type that will run them")
        rel = art.engine["path"]
        return Path(rel).name, [rel]
    # The fused ONNX Runtime graph where one was built (CPU contrib ops), else the portable one
    # (which is what CUDA / TensorRT execution providers want).
    rel = art.ort_graph["path"] if art.ort_graph is not None and settings.stage_backend == "python" else art.path
    return Path(rel).name, [r for r in (rel, f"{rel}.data") if r in manifest.files]


def write_repository(artifacts, out, settings: RepoSettings = RepoSettings(), force: bool = False) -> Path:
    """Write the model repository for `artifacts` at `out` (atomically: a partial folder renamed
    into place). The artifacts are verified in full first: a tampered directory is refused."""
    settings.check()
    src, target = absolute(artifacts), absolute(out)
    if exists(target):  # refused before the (full) verification, which takes a while on a big model
        why = "already exists (use --force to replace it)" if not force else not_a_repository(target)
        if why is not None:
            raise WanError(f"repository '{target}' {why}; not replaced")
    manifest = load_manifest(src, verify="full")
    names = list(manifest.stages)
    if MODEL in names:
        raise WanError(f"'{src}' has a stage named {MODEL!r}, which the repository's generation model uses")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)  # like wan-export --out: parents are made
    except OSError as exc:
        raise environment_error(exc, "repository folder", target.parent) from None
    check_writable_dir(target.parent, "repository folder")
    clean_stale(target)
    partial = partial_name(target)
    try:
        _write(src, manifest, partial, settings)
        commit(partial, target, force, not_a_repository, "repository", "use --force to replace it")
    finally:
        if partial.exists():
            remove(partial)
    return target


def _write(src: Path, manifest, out: Path, settings: RepoSettings) -> None:
    out.mkdir()
    arts = out / MODEL / "1" / "artifacts"
    for rel in [MANIFEST_NAME, *manifest.files]:
        link_or_copy(src / rel, arts / rel)
    (out / MODEL / "1" / "model.py").write_text(SHIM.format("wan_model"))
    (out / MODEL / "config.pbtxt").write_text(wan_config(settings))
    max_b = manifest.symbols["B"].max
    for name, stage in manifest.stages.items():
        version = out / name / "1"
        graph, rels = stage_files(manifest, name, settings)
        for rel in rels:
            link_or_copy(src / rel, version / Path(rel).name)
        batch = (settings.max_batch or max_b) if name in BATCHED_STAGES and batchable(stage.spec) else 0
        engine = stage.artifacts[settings.precision].engine
        if batch and settings.stage_backend == "tensorrt" and engine and "B" in engine.get("symbols", {}):
            batch = min(batch, engine["symbols"]["B"][-1])  # what the engine's profile allows
        info = {"stage": name, "spec": stage.spec.to_dict(), "graph": graph, "batched": batch > 0,
                "source": {Path(r).name: r for r in rels},
                "sha256": {Path(r).name: manifest.files[r]["sha256"] for r in rels},
                "threads": settings.threads, "instances": settings.instances, "spinning": settings.spinning}
        (version / STAGE_FILE).write_text(json.dumps(info, indent=1))
        if settings.stage_backend == "python":
            (version / "model.py").write_text(SHIM.format("stage_model"))
        (out / name / "config.pbtxt").write_text(stage_config(stage.spec, settings, batch, graph))
    marker = {"format": "wan-serve/1", "artifacts": str(src), "models": [MODEL, *manifest.stages],
              "manifest_sha256": hashlib.sha256(read_manifest_bytes(src)).hexdigest(), **asdict(settings)}
    (out / MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def not_a_repository(path: Path) -> str | None:
    """None if `path` is a repository wan-serve wrote (so --force may replace it), else why not."""
    try:
        marker = json.loads((path / MARKER).read_text())
        assert marker["format"].startswith("wan-serve/")
    except Exception:  # noqa: BLE001 - whatever it is, it is not ours
        return "is not a model repository written by wan-serve (no readable wan-serve.json)"
    extra = sorted(p.name for p in path.iterdir() if p.name not in {MARKER, *marker["models"]})
    if extra:
        return f"holds '{extra[0]}', which wan-serve did not write"
    return None


def read_marker(repo: Path) -> dict:
    """The repository's wan-serve.json, or a one-line WanError saying what `repo` is not."""
    why = not_a_repository(repo) if repo.is_dir() else "is not a directory"
    if not repo.exists():
        why = "does not exist"
    if why is not None:
        raise WanError(f"model repository '{repo}' {why}; write one with wan-serve repo")
    return json.loads((repo / MARKER).read_text())
