"""The artifact directory's `manifest.json`: schema, loading and integrity checks.

The schema lives here, in the lightest package, because the runtime must read it without the
build tools; `engines/artifacts.py` writes it.

    DIR/manifest.json                  this file (written last: no manifest, no artifact)
    DIR/onnx/<precision>/<stage>.onnx  one graph per stage and precision
    DIR/onnx/<precision>/<stage>.onnx.data   its external weights
    DIR/onnx/<precision>/dit.ort.onnx  the DiT with ONNX Runtime's fused ops (fp32, int8)
    DIR/.verified                      stat cache of files whose sha256 was checked

Integrity without slow start-up: every file's size is compared on every load (free, catches
truncation). The sha256 of a file is computed only when its stat stamp (size, mtime, ctime,
inode) differs from the one recorded in `.verified` when it was last hashed; the export writes
that cache, so an untouched directory starts without hashing anything. Any write to a file
changes its ctime, so an altered file is always re-hashed. `verify="full"` hashes everything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import WanError
from runtime.stages import STAGE_NAMES, STREAM_STAGE_NAMES, Geometry, StageSpec, SymbolRange

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
VERIFIED_NAME = ".verified"
FORMAT = "wan-export/1"
PRECISIONS = ("fp32", "fp16", "int8")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def stat_stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


@dataclass(frozen=True)
class Artifact:
    """One stage built at one precision: the graph file, how it was made and how it measured."""

    precision: str
    path: str  # relative to the artifact directory; a reduced precision may reuse the fp32 graph
    validation: dict  # measured errors (fp32: vs PyTorch; fp16/int8: vs the fp32 graph)
    details: dict = field(default_factory=dict)  # the recipe: fp32 islands, Q/DQ settings, ...
    engine: dict | None = None  # TensorRT .plan: path, size, profile, builder, targets
    # The same stage as an ONNX Runtime-only graph with fused contrib ops (path, validation,
    # ops); the onnxruntime backend prefers it. `path` stays the portable graph (TensorRT).
    ort_graph: dict | None = None

    def to_dict(self) -> dict:
        out = {"path": self.path, "validation": self.validation, "details": self.details}
        for key in ("engine", "ort_graph"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_dict(cls, precision: str, d: dict) -> "Artifact":
        return cls(precision, d["path"], d["validation"], d.get("details", {}), d.get("engine"),
                   d.get("ort_graph"))


@dataclass(frozen=True)
class Stage:
    spec: StageSpec
    artifacts: dict[str, Artifact]  # precision -> artifact


@dataclass(frozen=True)
class Manifest:
    model: dict  # the full model config, as export/config.py writes it
    geometry: Geometry
    latent_mean: tuple[float, ...]
    latent_std: tuple[float, ...]
    sampler: dict  # defaults: steps, shift, guidance, solver, fps
    video: dict  # defaults: frames, height, width
    symbols: dict[str, SymbolRange]  # what the graphs were exported and checked for
    stages: dict[str, Stage]
    files: dict[str, dict]  # relative path -> {"sha256", "size"}
    tools: dict[str, str]
    quality: dict = field(default_factory=dict)  # precision -> per-stage error, end-to-end PSNR
    calibration: dict | None = None  # how calibration data was made (reduced precisions)
    weights: dict = field(default_factory=dict)  # where the weights came from: source, path, sha256
    format: str = FORMAT

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "model": self.model,
            "geometry": self.geometry.to_dict(),
            "latent": {"mean": list(self.latent_mean), "std": list(self.latent_std)},
            "sampler": self.sampler,
            "video": self.video,
            "symbols": {k: v.to_list() for k, v in self.symbols.items()},
            "stages": {
                name: {"spec": s.spec.to_dict(),
                       "artifacts": {p: a.to_dict() for p, a in s.artifacts.items()}}
                for name, s in self.stages.items()
            },
            "files": self.files,
            "tools": self.tools,
            "quality": self.quality,
            "calibration": self.calibration,
            "weights": self.weights,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        stages = {
            name: Stage(
                StageSpec.from_dict(name, s["spec"]),
                {p: Artifact.from_dict(p, a) for p, a in s["artifacts"].items()},
            )
            for name, s in d["stages"].items()
        }
        return cls(
            model=d["model"],
            geometry=Geometry.from_dict(d["geometry"]),
            latent_mean=tuple(d["latent"]["mean"]),
            latent_std=tuple(d["latent"]["std"]),
            sampler=d["sampler"],
            video=d["video"],
            symbols={k: SymbolRange(*v) for k, v in d["symbols"].items()},
            stages=stages,
            files=d["files"],
            tools=d["tools"],
            quality=d.get("quality", {}),
            calibration=d.get("calibration"),
            weights=d.get("weights", {}),
            format=d["format"],
        )

    def precisions(self) -> list[str]:
        """Precisions built for every stage."""
        return [p for p in PRECISIONS if all(p in s.artifacts for s in self.stages.values())]


def load_manifest(root: str | os.PathLike, verify: str = "auto") -> Manifest:
    """Read and check DIR/manifest.json. `verify`: "auto" (stat cache), "full" or "none"."""
    root = Path(root)
    if not root.exists():
        raise WanError(f"artifact directory '{root}' does not exist; build it with wan-export")
    if not root.is_dir():
        raise WanError(f"artifact directory '{root}' is not a directory")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise WanError(f"'{root}' has no {MANIFEST_NAME}: it is not a complete artifact "
                       "directory (rebuild it with wan-export)")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise WanError(f"{path} has format {data.get('format')!r}; this runtime reads "
                           f"{FORMAT!r} (rebuild with the matching wan-export)")
        manifest = Manifest.from_dict(data)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise WanError(f"{path} is corrupt ({type(exc).__name__}: {exc}); rebuild with wan-export")
    if not set(STAGE_NAMES) <= set(manifest.stages) <= {*STAGE_NAMES, *STREAM_STAGE_NAMES}:
        raise WanError(f"{path} lists stages {sorted(manifest.stages)}, expected "
                       f"{list(STAGE_NAMES)} (+ the streaming decoder); rebuild with wan-export")
    if verify != "none":
        verify_files(root, manifest.files, full=verify == "full")
    return manifest


def verify_files(root: Path, files: dict[str, dict], full: bool = False) -> None:
    """Check sizes always and sha256 where the stat stamp changed (or everything if `full`)."""
    cache_path = root / VERIFIED_NAME
    try:
        cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        cache = {}
    hashed = {}
    for rel, entry in files.items():
        path = root / rel
        if not path.is_file():
            raise WanError(f"artifact file '{path}' is missing; rebuild '{root}' with wan-export")
        stamp = stat_stamp(path)
        if stamp[0] != entry["size"]:
            raise WanError(f"artifact file '{path}' has {stamp[0]} bytes, the manifest says "
                           f"{entry['size']}; rebuild '{root}' with wan-export")
        cached = cache.get(rel)
        if not full and cached == [*stamp, entry["sha256"]]:
            continue
        log.debug("hashing %s", path)
        if sha256_file(path) != entry["sha256"]:
            raise WanError(f"artifact file '{path}' does not match its sha256 in the manifest "
                           f"(altered or corrupt); rebuild '{root}' with wan-export")
        hashed[rel] = [*stamp, entry["sha256"]]
    if hashed:
        write_verified(root, {**cache, **hashed})


def write_verified(root: Path, stamps: dict[str, list]) -> None:
    """Record checked files; best effort, since the directory may be read-only."""
    try:
        tmp = root / f"{VERIFIED_NAME}.{os.getpid()}"
        tmp.write_text(json.dumps(stamps))
        os.replace(tmp, root / VERIFIED_NAME)
    except OSError as exc:
        log.debug("could not record verified files in %s: %s", root, exc)
