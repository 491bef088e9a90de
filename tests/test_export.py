"""wan-export's library side: the artifact directory, its manifest, and all-or-nothing writes."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest

from export import build as build_mod
from export.build import build_artifacts
from export.config import PRESETS
from runtime.errors import WanError
from runtime.manifest import load_manifest, sha256_file
from runtime.stages import STAGE_NAMES, STREAM_STAGE_NAMES
from tests.conftest import tiny_config


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


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    """A stage over tolerance fails the build; an existing directory survives untouched, and
    no half-written directory is left behind."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    # Stand-ins keep this test about the writer (the real export is covered elsewhere).
    monkeypatch.setattr(build_mod, "export_stage", lambda m, spec, sym, path, *rest: path.write_bytes(b"x"))
    monkeypatch.setattr(build_mod, "validate_stage",
                        lambda *a, **k: {"passed": False, "max_abs": 1.0, "max_rel": 1.0,
                                         "tolerance": 1e-4})
    with pytest.raises(WanError, match="above the tolerance"):
        build_artifacts(tiny_config(), target, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in target.iterdir()] == ["mine.txt"]


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
