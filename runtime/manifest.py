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

What this protects against: truncated, corrupt, swapped or edited files, and a manifest that
points outside the directory (every path must be a listed file that resolves inside it, links
included). What it does not: `.verified` is a cache in a writable directory, not a signature,
and whoever can rewrite the files can rewrite the manifest's hashes too. An artifact directory
is trusted like code; deployments that copy artifacts around pin the manifest itself
(`expect_sha256`, `wan-run --expect-manifest`), which hashes every file and ignores the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from runtime.errors import WanError
from runtime.files import regular_file
from runtime.stages import CONTEXT_STAGE, STAGE_NAMES, STREAM_STAGE_NAMES, SYMBOLS, Geometry, StageSpec, SymbolRange

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
VERIFIED_NAME = ".verified"
FORMAT = "wan-export/1"
PRECISIONS = ("fp32", "fp16", "int8")
# The stages each model family's runtime needs (required, optional). Manifests from before the
# released-model family have no "family": they are the seed's.
FAMILY_STAGES = {
    "seed": (STAGE_NAMES, (*STREAM_STAGE_NAMES, CONTEXT_STAGE)),  # the context stage: --text-kv builds
    "wan": (("text_encoder", "dit", *STREAM_STAGE_NAMES),
            ("vae_encoder", "vae_encoder_first", "vae_encoder_step", "image_encoder", "dit_2",
             "dit_context", "dit_2_context")),  # the context stages: --text-kv builds
}
SHA256_RE = re.compile(r"[0-9a-f]{64}")


class Malformed(ValueError):
    """A manifest value of the wrong type or range; the message says where."""


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

    def paths(self) -> list[str]:
        """Every file this artifact runs: the graph, its ONNX Runtime graph, its engine."""
        return [self.path, *(x["path"] for x in (self.ort_graph, self.engine) if x is not None)]


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
    family: str = "seed"  # which runtime module conditions the DiT (runtime/seed.py, runtime/wan.py)
    family_config: dict = field(default_factory=dict)  # that module's settings (wan: text, scheduler)
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
            "family": self.family,
            "family_config": self.family_config,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        """Parse a manifest, checking every value the runtime uses (Malformed says which)."""
        _need(d, dict, "the manifest")
        geometry = _geometry(_get(d, "geometry", dict))
        latent = _get(d, "latent", dict)
        mean, std = (_numbers(_get(latent, k, list), f"latent.{k}") for k in ("mean", "std"))
        if len(mean) != geometry.latent_channels or len(std) != geometry.latent_channels:
            raise Malformed(f"latent.mean/std must have {geometry.latent_channels} entries (the latent "
                            f"channels), got {len(mean)} and {len(std)}")
        if min(std) <= 0:
            raise Malformed("latent.std must be > 0")
        symbols = _symbols(_get(d, "symbols", dict))
        stages = {}
        for name, s in _get(d, "stages", dict).items():
            _need(s, dict, f"stages.{name}")
            try:
                spec = StageSpec.from_dict(name, _get(s, "spec", dict, f"stages.{name}"))
            except (KeyError, TypeError, ValueError) as exc:
                raise Malformed(f"stages.{name}.spec is not a stage spec ({exc})") from None
            used = {d.symbol for t in spec.inputs + spec.outputs for d in t.dims if d.symbol is not None}
            unknown = used - set(SYMBOLS)
            if unknown:
                raise Malformed(f"stages.{name}.spec uses unknown symbols {sorted(unknown)}")
            b = _get(s["spec"], "batch", int, f"stages.{name}.spec", default=1)
            if not 1 <= b <= symbols["B"].max:
                raise Malformed(f"stages.{name}.spec.batch must be 1..{symbols['B'].max} (the B range), got {b}")
            arts = _get(s, "artifacts", dict, f"stages.{name}")
            stages[name] = Stage(spec, {p: _artifact(p, a, f"stages.{name}.artifacts.{p}")
                                        for p, a in arts.items()})
        files = _get(d, "files", dict)
        for rel, entry in files.items():
            where = f"files[{rel!r}]"
            _need(entry, dict, where)
            if not isinstance(entry.get("sha256"), str) or not SHA256_RE.fullmatch(entry["sha256"]):
                raise Malformed(f"{where}.sha256 must be 64 hex digits")
            _get(entry, "size", int, where)
        for key in ("sampler", "video"):
            _get(d, key, dict)
        return cls(
            model=_get(d, "model", dict), geometry=geometry,
            latent_mean=tuple(mean), latent_std=tuple(std),
            sampler=d["sampler"], video=d["video"], symbols=symbols, stages=stages, files=files,
            tools=_get(d, "tools", dict), quality=_get(d, "quality", dict, default={}),
            calibration=_get(d, "calibration", dict, default=None),
            weights=_get(d, "weights", dict, default={}), format=_get(d, "format", str),
            family=_get(d, "family", str, default="seed"),
            family_config=_get(d, "family_config", dict, default={}),
        )

    def precisions(self) -> list[str]:
        """Precisions built for every stage."""
        return [p for p in PRECISIONS if all(p in s.artifacts for s in self.stages.values())]


_TYPES = {dict: "an object", list: "a list", str: "a string", int: "a whole number"}


def _need(value, kind: type, where: str):
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise Malformed(f"{where} must be {_TYPES[kind]}, got {json.dumps(value)[:40]}")
    return value


_MISSING = object()


def _get(d: dict, key: str, kind: type, where: str = "", default=_MISSING):
    """d[key] checked to be of `kind` (`default` when the key is absent, if one is given)."""
    if key not in d:
        if default is not _MISSING:
            return default
        raise Malformed(f"{where + '.' if where else ''}{key} is missing")
    if default is None and d[key] is None:
        return None
    return _need(d[key], kind, f"{where + '.' if where else ''}{key}")


def _numbers(values: list, where: str) -> list[float]:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
               for v in values):
        raise Malformed(f"{where} must hold finite numbers")
    return [float(v) for v in values]


def _positive(d: dict, key: str, where: str) -> int:
    value = _get(d, key, int, where)
    if value < 1:
        raise Malformed(f"{where}.{key} must be >= 1, got {value}")
    return value


def _geometry(g: dict) -> Geometry:
    patch = _get(g, "patch", list, "geometry")
    if len(patch) != 2 or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in patch):
        raise Malformed(f"geometry.patch must be two whole numbers >= 1, got {json.dumps(patch)[:40]}")
    return Geometry(*(_positive(g, k, "geometry") for k in
                      ("latent_channels", "temporal_stride", "spatial_stride")), tuple(patch))


def _symbols(d: dict) -> dict[str, SymbolRange]:
    out = {}
    for name in SYMBOLS:
        r = _get(d, name, list, "symbols")
        if len(r) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in r) \
                or not 1 <= r[0] <= r[1] <= r[2]:
            raise Malformed(f"symbols.{name} must be [min, opt, max] with 1 <= min <= opt <= max, "
                            f"got {json.dumps(r)[:40]}")
        out[name] = SymbolRange(*r)
    return out


def _artifact(precision: str, a: dict, where: str) -> Artifact:
    _need(a, dict, where)
    _get(a, "path", str, where)
    for key in ("ort_graph", "engine"):
        if a.get(key) is not None:
            _get(_need(a[key], dict, f"{where}.{key}"), "path", str, f"{where}.{key}")
    _get(a, "validation", dict, where)
    _get(a, "details", dict, where, default={})
    return Artifact.from_dict(precision, a)


def read_manifest_bytes(root: Path) -> bytes:
    """The bytes of DIR/manifest.json, after checking the directory and the file."""
    if not root.exists():
        raise WanError(f"artifact directory '{root}' does not exist; build it with wan-export")
    if not root.is_dir():
        raise WanError(f"artifact directory '{root}' is not a directory")
    path = root / MANIFEST_NAME
    if not (path.exists() or path.is_symlink()):
        raise WanError(f"'{root}' has no {MANIFEST_NAME}: it is not a complete artifact "
                       "directory (rebuild it with wan-export)")
    return regular_file(path, "manifest").read_bytes()


def load_manifest(root: str | os.PathLike, verify: str = "auto",
                  expect_sha256: str | None = None) -> Manifest:
    """Read and check DIR/manifest.json. `verify`: "auto" (stat cache), "full" or "none".
    `expect_sha256`: the manifest's own sha256, pinned by the deployment; every file is then
    hashed (the stat cache is ignored: it lives in the directory being checked)."""
    root = Path(root)
    raw = read_manifest_bytes(root)
    path = root / MANIFEST_NAME
    if expect_sha256 is not None:
        pinned = expect_sha256.strip().lower()
        if not SHA256_RE.fullmatch(pinned):
            raise WanError(f"expected manifest sha256 {expect_sha256!r} is not 64 hex digits")
        if verify == "none":
            raise WanError("a pinned manifest (--expect-manifest) needs its files verified: "
                           "drop --verify none")
        actual = hashlib.sha256(raw).hexdigest()
        if actual != pinned:
            raise WanError(f"{path} has sha256 {actual}, not the pinned {pinned}: these are not the "
                           "artifacts this deployment expects")
        verify = "full"
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise Malformed(f"the manifest must be a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise WanError(f"{path} has format {data.get('format')!r}; this runtime reads "
                           f"{FORMAT!r} (rebuild with the matching wan-export)")
        manifest = Manifest.from_dict(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WanError(f"{path} is corrupt ({type(exc).__name__}: {exc}); rebuild with wan-export")
    except Malformed as exc:
        raise WanError(f"{path} is malformed: {exc}; rebuild with wan-export") from None
    if manifest.family not in FAMILY_STAGES:
        raise WanError(f"{path} is of model family {manifest.family!r}; this runtime runs "
                       f"{', '.join(FAMILY_STAGES)} (update wan-export)")
    required, optional = FAMILY_STAGES[manifest.family]
    if not set(required) <= set(manifest.stages) <= {*required, *optional}:
        raise WanError(f"{path} lists stages {sorted(manifest.stages)}, expected {list(required)} (+ "
                       f"{', '.join(optional)}); rebuild with wan-export")
    check_paths(root, manifest)
    if verify != "none":
        verify_files(root, manifest.files, full=verify == "full")
    return manifest


def inside(root: Path, rel: str) -> Path:
    """root/rel, if `rel` is a plain relative path that resolves (links followed) inside root."""
    pure = PurePosixPath(rel)
    if (not rel or "\\" in rel or pure.is_absolute() or re.match(r"[A-Za-z]:", rel)
            or any(part in ("..", ".", "") for part in rel.split("/"))):
        raise WanError(f"artifact path {rel!r} in {root / MANIFEST_NAME} is not a plain path inside "
                       "the directory; refused (rebuild with wan-export)")
    path = root / rel
    real_root = root.resolve()
    if not path.resolve().is_relative_to(real_root):
        raise WanError(f"artifact file '{path}' is a link that leads out of '{root}'; refused")
    return path


def listed_file(root: Path, manifest: Manifest, rel, what: str) -> Path:
    """root/rel for a file a model family reads (a tokenizer): listed, hence verified, and inside."""
    if not isinstance(rel, str) or rel not in manifest.files:
        raise WanError(f"{what} {rel!r} is not among the files '{root / MANIFEST_NAME}' lists; refused "
                       "(rebuild with wan-export)")
    return inside(root, rel)


def check_paths(root: Path, manifest: Manifest) -> None:
    """Every file the manifest lists lies inside `root`, and every file a stage runs is listed
    (so it is size- and hash-checked like the others)."""
    for rel in manifest.files:
        inside(root, rel)
    for name, stage in manifest.stages.items():
        for art in stage.artifacts.values():
            for rel in art.paths():
                inside(root, rel)
                if rel not in manifest.files:
                    raise WanError(f"stage {name} ({art.precision}) runs '{rel}', which the manifest "
                                   f"does not list among its files; refused (rebuild with wan-export)")


def not_an_artifact_dir(root: Path) -> str | None:
    """None if `root` is an artifact directory holding only what wan-export wrote; else why
    not, as a phrase ("holds 'notes.txt', which wan-export did not write"). `--force` replaces
    nothing else."""
    if root.is_symlink():
        return "is a symbolic link"
    if not root.is_dir():
        return "is not a directory"
    try:
        data = json.loads(regular_file(root / MANIFEST_NAME, "manifest").read_bytes())
        files = data["files"]
        assert isinstance(files, dict) and str(data["format"]).startswith("wan-export/")
    except Exception:  # noqa: BLE001 - whatever it is, it is not a readable manifest
        return "is not an artifact directory written by wan-export (no readable manifest.json)"
    ours = {MANIFEST_NAME, VERIFIED_NAME, *files}
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                return f"holds a link '{rel}', which wan-export did not write"
            if name in names and rel not in ours and not re.fullmatch(rf"{VERIFIED_NAME}\.\d+", rel):
                return f"holds '{rel}', which wan-export did not write"
    return None


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
        if not (path.exists() or path.is_symlink()):
            raise WanError(f"artifact file '{path}' is missing; rebuild '{root}' with wan-export")
        regular_file(path, "artifact file")
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
    tmp = root / f"{VERIFIED_NAME}.{os.getpid()}"
    try:
        tmp.write_text(json.dumps(stamps))
        os.replace(tmp, root / VERIFIED_NAME)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.debug("could not record verified files in %s: %s", root, exc)
