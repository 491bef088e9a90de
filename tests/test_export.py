"""wan-export's library side: the artifact directory, its manifest, and all-or-nothing writes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import onnx
import pytest

from export import build as build_mod
from export.build import build_artifacts
from export.config import PRESETS
from runtime.errors import WanError
from runtime.manifest import load_manifest, sha256_file
from runtime.stages import STAGE_NAMES, STREAM_STAGE_NAMES
from tests.conftest import dead_pid, fake_stages, small_filesystem, tiny_config


def test_manifest_contents(tiny_dir):
    data = json.loads((tiny_dir / "manifest.json").read_text())
    assert data["model"]["name"] == "tiny" and data["model"]["dit"]["attention"] == "factorized"
    assert set(data["stages"]) == {*STAGE_NAMES, *STREAM_STAGE_NAMES}
    assert data["latent"]["mean"] == [0.0] * 4 and data["latent"]["std"] == [1.0] * 4
    assert data["sampler"] == {"steps": 4, "shift": 5.0, "guidance": 5.0, "guidance_rescale": 0.0,
                               "solver": "dpm++2m", "fps": 16}
    assert {"torch", "onnx", "opset", "onnxruntime"} <= set(data["tools"])
    for name, stage in data["stages"].items():
        v = stage["artifacts"]["fp32"]["validation"]
        assert v["passed"] and v["finite"] and v["max_rel"] <= v["tolerance"] == 1e-4
        assert len(v["shapes"]) == 2  # the export shape and a second one
    # every file (graphs and their external data) is hashed, and nothing else is there
    on_disk = {p.relative_to(tiny_dir).as_posix() for p in tiny_dir.rglob("*") if p.is_file()}
    assert set(data["files"]) == on_disk - {"manifest.json", ".verified"}
    assert {f"onnx/fp32/{s}.onnx.data" for s in STAGE_NAMES} <= set(data["files"])
    for rel, entry in data["files"].items():
        assert sha256_file(tiny_dir / rel) == entry["sha256"]


def test_dit_has_an_onnx_runtime_graph(tiny_dir):
    """The DiT is also exported with ONNX Runtime's fused contrib ops, checked against PyTorch
    like every graph, and the runtime's ONNX Runtime backend runs that graph."""
    from runtime.backends import OnnxRuntimeBackend

    manifest = load_manifest(tiny_dir)
    art = manifest.stages["dit"].artifacts["fp32"]
    assert art.ort_graph["path"] == "onnx/fp32/dit.ort.onnx" and art.path == "onnx/fp32/dit.onnx"
    v = art.ort_graph["validation"]
    assert v["passed"] and v["max_rel"] <= v["tolerance"] == 1e-4
    nodes = onnx.load(str(tiny_dir / art.ort_graph["path"]), load_external_data=False).graph.node
    ops = {f"{n.domain}.{n.op_type}" for n in nodes}
    assert set(art.ort_graph["ops"]) == {"com.microsoft.MultiHeadAttention",
                                         "com.microsoft.RotaryEmbedding"} <= ops
    # every rotation fused, the per-frame reference keys' too: per factorized block the spatial
    # and temporal q and k, the cross-attention's q and its keys
    rotations = sum(n.op_type == "RotaryEmbedding" for n in nodes)
    assert rotations == 6 * PRESETS["tiny"].dit.num_layers
    portable = {f"{n.domain}.{n.op_type}" for n in onnx.load(str(tiny_dir / art.path),
                                                             load_external_data=False).graph.node}
    assert not any(op.startswith("com.microsoft") for op in portable)  # TensorRT reads this one
    assert OnnxRuntimeBackend(tiny_dir, manifest).stages["dit"].path.name == "dit.ort.onnx"
    assert OnnxRuntimeBackend(tiny_dir, manifest, contrib_ops=False).stages["dit"].path.name == "dit.onnx"


def test_float_layer_typo_is_refused(tiny_dir):
    stages = load_manifest(tiny_dir).stages
    build_mod.check_float_layers(tiny_dir, stages, ("blocks.0.attn1", "vae.decoder.head"))
    with pytest.raises(WanError, match="'blocks.0.atn1' matches no quantizable layer"):
        build_mod.check_float_layers(tiny_dir, stages, ("blocks.0.attn1", "blocks.0.atn1"))


def test_graph_axes_are_named_from_the_spec(tiny_dir):
    model = onnx.load(str(tiny_dir / "onnx/fp32/vae_decoder.onnx"), load_external_data=False)
    out = model.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in out] == ["B", 3, "4*F-3", "16*Hp", "16*Wp"]


def test_existing_directory_needs_force(tiny_dir, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    with pytest.raises(WanError, match="already exists; pass --force"):
        build_artifacts(tiny_config(), target)
    assert (target / "mine.txt").read_text() == "keep me"


def test_failed_export_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    """A stage over tolerance fails the build; an existing directory survives untouched, and
    no half-written directory is left behind."""
    target = tmp_path / "out"
    shutil.copytree(tiny_dir, target)
    before = sorted(p.name for p in target.iterdir())
    # Stand-ins keep this test about the writer (the real export is covered elsewhere).
    monkeypatch.setattr(build_mod, "export_stage", lambda m, spec, sym, path, *rest: path.write_bytes(b"x"))
    monkeypatch.setattr(build_mod, "validate_stage",
                        lambda *a, **k: {"passed": False, "max_abs": 1.0, "max_rel": 1.0,
                                         "tolerance": 1e-4})
    with pytest.raises(WanError, match="above the tolerance"):
        build_artifacts(tiny_config(), target, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert sorted(p.name for p in target.iterdir()) == before
    load_manifest(target, verify="full")


def test_force_replaces_only_after_success(tiny_dir, tmp_path, monkeypatch):
    target = tmp_path / "out"
    shutil.copytree(tiny_dir, target)

    def interrupted(module, spec, symbols, path, *rest):  # Ctrl-C during the second stage
        if spec.name == "dit":
            raise KeyboardInterrupt
        path.write_bytes(b"x")

    monkeypatch.setattr(build_mod, "export_stage", interrupted)
    monkeypatch.setattr(build_mod, "validate_stage", lambda *a, **k: {
        "passed": True, "max_abs": 0.0, "max_rel": 0.0, "tolerance": 1e-4})
    with pytest.raises(KeyboardInterrupt):
        build_artifacts(tiny_config(), target, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    load_manifest(target, verify="full")  # the old build is intact


def test_failed_export_removes_the_parents_it_created(tmp_path, monkeypatch):
    monkeypatch.setattr(build_mod, "export_stage", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        build_artifacts(tiny_config(), tmp_path / "new" / "deeper" / "out")
    assert list(tmp_path.iterdir()) == []


def test_output_below_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(WanError, match="is not a directory"):
        build_artifacts(tiny_config(), tmp_path / "file" / "out")


# --- nothing the user has is lost ------------------------------------------------------------


def test_directory_made_while_the_build_runs_is_kept(tmp_path, monkeypatch):
    """`wan-export --out D & mkdir D; echo x > D/precious.txt`: the commit never replaces."""
    target = tmp_path / "D"

    def user_makes_it(spec):
        if spec.name == "vae_decoder_step" and not target.exists():
            target.mkdir()
            (target / "precious.txt").write_text("x")

    fake_stages(monkeypatch, build_mod, user_makes_it)
    with pytest.raises(WanError, match="appeared while this run was working; it was left as it is"):
        build_artifacts(tiny_config(), target)
    assert [p.name for p in target.iterdir()] == ["precious.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["D"]  # no partial left


def test_two_concurrent_builds_one_wins(tmp_path, monkeypatch):
    """A second build to the same D finishes while the first runs: the first fails in one
    line and the second's artifacts stay (before, both said success and the later replaced)."""
    target, other = tmp_path / "D", {}

    def concurrent_build(spec):
        if spec.name == "dit" and not other:
            other["started"] = True  # (its own graphs come through here too)
            build_artifacts(dataclasses.replace(tiny_config(), seed=7), target)

    fake_stages(monkeypatch, build_mod, concurrent_build)
    with pytest.raises(WanError, match="appeared while this run was working"):
        build_artifacts(tiny_config(), target)
    assert load_manifest(target).model["seed"] == 7  # the other build's
    assert [p.name for p in tmp_path.iterdir()] == ["D"]


@pytest.mark.parametrize("what", ["source tree", "artifacts plus a user file", "a link to artifacts"])
def test_force_replaces_only_an_artifact_directory(what, tiny_dir, tmp_path):
    target = tmp_path / "my_project"
    if what == "source tree":
        (target / "src").mkdir(parents=True)
        (target / "src" / "main.py").write_text("print('years of work')")
        needle = "not an artifact directory written by wan-export"
    elif what == "artifacts plus a user file":
        shutil.copytree(tiny_dir, target)
        (target / "onnx" / "notes.txt").write_text("mine")
        needle = "holds 'onnx/notes.txt', which wan-export did not write"
    else:
        shutil.copytree(tiny_dir, tmp_path / "real")
        target.symlink_to(tmp_path / "real")
        needle = "is a symbolic link"
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    with pytest.raises(WanError, match=needle):
        build_artifacts(tiny_config(), target, force=True)  # refused before any work
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before


def test_next_build_removes_partials_of_killed_builds(tmp_path, monkeypatch):
    target = tmp_path / "D"
    stale = tmp_path / f".D.partial-{dead_pid()}"  # what a SIGKILLed build of earlier versions left
    stale.mkdir()
    (stale / "dit.onnx").write_bytes(b"half")
    fake_stages(monkeypatch, build_mod)
    build_artifacts(tiny_config(), target)
    assert [p.name for p in tmp_path.iterdir()] == ["D"]


def test_files_are_readable_by_whoever_the_umask_allows(tiny_dir):
    """onnx writes external data 0600; a shared artifact directory needs them like the rest."""
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.relative_to(tiny_dir).as_posix(): p.stat().st_mode & 0o777
             for p in tiny_dir.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o666 & ~mask}, modes


def test_out_of_space_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    with small_filesystem(tmp_path / "small", size="16k") as fs:
        monkeypatch.setattr(build_mod, "export_stage", lambda m, spec, sym, path, *rest:
                            path.write_bytes(b"x" * 8192))
        monkeypatch.setattr(build_mod, "validate_stage", lambda *a, **k: {
            "passed": True, "max_abs": 0.0, "max_rel": 0.0, "tolerance": 1e-4})
        with pytest.raises(WanError, match="no space left on the device; nothing was written"):
            build_artifacts(tiny_config(), fs / "D")
        assert list(fs.iterdir()) == []


def test_read_only_place_is_refused_up_front(tmp_path):
    with small_filesystem(tmp_path / "ro", read_only=True) as fs:
        with pytest.raises(WanError, match="is not writable .the file system is read-only"):
            build_artifacts(tiny_config(), fs / "D")
