"""Integrity checks: refuse altered artifacts, without hashing gigabytes on every start."""

from __future__ import annotations

import json
import shutil

import pytest

from runtime import manifest as manifest_mod
from runtime.errors import WanError
from runtime.manifest import load_manifest


@pytest.fixture
def copy(tiny_dir, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(tiny_dir, dst)
    return dst


def count_hashes(monkeypatch):
    calls = []
    real = manifest_mod.sha256_file
    monkeypatch.setattr(manifest_mod, "sha256_file", lambda p, *a: calls.append(p) or real(p, *a))
    return calls


def test_unchanged_directory_is_not_rehashed(copy, monkeypatch):
    calls = count_hashes(monkeypatch)
    load_manifest(copy)  # a copy has new inodes: hashed once, then recorded
    first = len(calls)
    assert first == 12  # 5 stage graphs + the DiT's ONNX Runtime graph, and their weights
    load_manifest(copy)
    assert len(calls) == first  # the stat cache says nothing changed
    load_manifest(copy, verify="full")
    assert len(calls) == 2 * first


def test_altered_file_is_refused(copy):
    load_manifest(copy)  # records the stat cache; the change below must still be caught
    data = copy / "onnx/fp32/dit.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, different content
    data.write_bytes(bytes(raw))
    with pytest.raises(WanError, match="does not match its sha256"):
        load_manifest(copy)


def test_truncated_missing_and_corrupt(copy):
    data = copy / "onnx/fp32/vae_decoder.onnx.data"
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(WanError, match="bytes, the manifest says"):
        load_manifest(copy)
    data.unlink()
    with pytest.raises(WanError, match="is missing"):
        load_manifest(copy)
    (copy / "manifest.json").write_text("{broken")
    with pytest.raises(WanError, match="corrupt"):
        load_manifest(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(WanError, match="no manifest.json"):
        load_manifest(copy)


def test_other_format_is_refused(copy):
    path = copy / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format": "wan-export/0"}))
    with pytest.raises(WanError, match="format"):
        load_manifest(copy)


def test_missing_directory(tmp_path):
    with pytest.raises(WanError, match="does not exist"):
        load_manifest(tmp_path / "nope")


def test_manifest_without_guidance_rescale_samples_with_plain_guidance(copy):
    """Artifacts exported before guidance rescale existed keep sampling as they did."""
    from runtime.pipeline import Pipeline

    path = copy / "manifest.json"
    data = json.loads(path.read_text())
    data["sampler"]["guidance_rescale"] = 0.5
    path.write_text(json.dumps(data))
    assert Pipeline.from_dir(copy).check_request().guidance_rescale == 0.5  # read when present
    del data["sampler"]["guidance_rescale"]
    path.write_text(json.dumps(data))
    assert Pipeline.from_dir(copy).check_request().guidance_rescale == 0.0
