"""Integrity checks: refuse altered artifacts, without hashing gigabytes on every start."""

from __future__ import annotations

import json
import os
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
    # every graph, its weights and the engines: each hashed once
    assert first == len(load_manifest(copy, verify="none").files) >= 12
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


# --- every path stays inside the directory and is a listed, verified file --------------------


def edit(root, change) -> None:
    """Rewrite root/manifest.json through `change(data)`."""
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def relist(data, root, rel) -> None:
    """Update a file's size and sha256 in the manifest, as someone swapping it would."""
    data["files"][rel] = {"sha256": manifest_mod.sha256_file(root / rel), "size": (root / rel).stat().st_size}


@pytest.mark.parametrize("rel", ["../../../../etc/passwd", "/etc/passwd", "onnx/../../x", "onnx\\\\x", "C:/x"])
def test_listed_file_outside_the_directory_is_refused_unopened(copy, monkeypatch, rel):
    edit(copy, lambda d: d["files"].update({rel: {"sha256": "0" * 64, "size": 1}}))
    calls = count_hashes(monkeypatch)
    for verify in ("auto", "none"):
        with pytest.raises(WanError, match="is not a plain path inside the directory"):
            load_manifest(copy, verify=verify)
    assert calls == []


def test_stage_graph_outside_or_unlisted_is_refused(copy, tmp_path):
    outside = tmp_path / "evil.onnx"
    shutil.copy(copy / "onnx/fp32/dit.onnx", outside)
    edit(copy, lambda d: d["stages"]["dit"]["artifacts"]["fp32"].update(path="../evil.onnx"))
    with pytest.raises(WanError, match="not a plain path inside"):
        load_manifest(copy, verify="none")
    shutil.copy(copy / "onnx/fp32/dit.onnx", copy / "onnx/fp32/extra.onnx")  # inside, unlisted
    edit(copy, lambda d: d["stages"]["dit"]["artifacts"]["fp32"]["ort_graph"].update(path="onnx/fp32/extra.onnx"))
    edit(copy, lambda d: d["stages"]["dit"]["artifacts"]["fp32"].update(path="onnx/fp32/dit.onnx"))
    for verify in ("full", "none"):
        with pytest.raises(WanError, match="runs 'onnx/fp32/extra.onnx', which the manifest does not list"):
            load_manifest(copy, verify=verify)


def test_link_that_leaves_the_directory_is_refused(copy, tmp_path):
    data = copy / "onnx/fp32/dit.onnx.data"
    shutil.move(data, tmp_path / "elsewhere.data")
    data.symlink_to(tmp_path / "elsewhere.data")  # same bytes, same hash: only the place differs
    with pytest.raises(WanError, match="is a link that leads out of"):
        load_manifest(copy, verify="full")
    data.unlink()
    shutil.move(tmp_path / "elsewhere.data", copy / "onnx/fp32/real.data")
    data.symlink_to("real.data")  # a link inside the directory is fine
    load_manifest(copy, verify="full")


MALFORMED = {
    "a list": (lambda d: [1, 2, 3], "must be a JSON object"),
    "file entry a number": (lambda d: d["files"].update({"onnx/fp32/dit.onnx": 5}), "must be an object"),
    "file size a string": (lambda d: d["files"]["onnx/fp32/dit.onnx"].update(size="big"), "size must be a whole"),
    "bad sha256": (lambda d: d["files"]["onnx/fp32/dit.onnx"].update(sha256="xyz"), "64 hex digits"),
    "missing symbols": (lambda d: d.pop("symbols"), "symbols is missing"),
    "missing a symbol": (lambda d: d["symbols"].pop("Hp") and None, "symbols.Hp is missing"),
    "symbol range reversed": (lambda d: d["symbols"].update(F=[5, 2, 1]), "1 <= min <= opt <= max"),
    "stride 0": (lambda d: d["geometry"].update(spatial_stride=0), "spatial_stride must be >= 1"),
    "patch 0": (lambda d: d["geometry"].update(patch=[0, 2]), "patch must be two whole numbers >= 1"),
    "std of zero": (lambda d: d["latent"].update(std=[0.0] * len(d["latent"]["std"])), "std must be > 0"),
    "mean too short": (lambda d: d["latent"].update(mean=[0.0]), "entries"),
    "stage spec garbage": (lambda d: d["stages"]["dit"].update(spec={"inputs": 3}), "not a stage spec"),
    "unknown symbol": (lambda d: d["stages"]["dit"]["spec"]["inputs"][0].update(dims=["B", "Q"]), "unknown symbols"),
    "batch 0": (lambda d: d["stages"]["dit"]["spec"].update(batch=0), r"spec.batch must be 1\.\.8"),
    "batch a string": (lambda d: d["stages"]["dit"]["spec"].update(batch="2"), "batch must be a whole"),
    "artifact path a number": (lambda d: d["stages"]["dit"]["artifacts"]["fp32"].update(path=3), "path must be a string"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_manifest_is_one_line(copy, case):
    change, needle = MALFORMED[case]
    path = copy / "manifest.json"
    data = json.loads(path.read_text())
    replaced = change(data)  # a whole new value, or None / whatever a dict method returns
    path.write_text(json.dumps(replaced if isinstance(replaced, list) else data))
    with pytest.raises(WanError, match=needle) as err:
        load_manifest(copy, verify="none")
    assert "\n" not in str(err.value)


def test_graph_swapped_with_its_hash_updated_is_refused_at_load(copy):
    """Hashes only say a file is the one listed; the graph's inputs and outputs must also be its
    stage's, checked when the session opens rather than at the first call."""
    from runtime.pipeline import Pipeline

    shutil.copy(copy / "onnx/fp32/vae_decoder.onnx", copy / "onnx/fp32/dit.ort.onnx")  # its weights stay listed
    edit(copy, lambda d: relist(d, copy, "onnx/fp32/dit.ort.onnx"))
    with pytest.raises(WanError, match="dit.ort.onnx is not the dit stage: its inputs are"):
        Pipeline.from_dir(copy)


def test_pinned_manifest(copy):
    """The stat cache is a cache, not a signature: whoever can write the directory can forge
    it. A pinned manifest sha256 ignores it and hashes everything."""
    good = manifest_mod.sha256_file(copy / "manifest.json")
    load_manifest(copy, expect_sha256=good.upper())
    with pytest.raises(WanError, match="not the pinned"):
        load_manifest(copy, expect_sha256="0" * 64)
    with pytest.raises(WanError, match="needs its files verified"):
        load_manifest(copy, verify="none", expect_sha256=good)
    # alter a file and forge its stamp in .verified: the cache is fooled (as documented) ...
    data = copy / "onnx/fp32/dit.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[10] ^= 1
    data.write_bytes(bytes(raw))
    cache = json.loads((copy / ".verified").read_text())
    cache["onnx/fp32/dit.onnx.data"] = [*manifest_mod.stat_stamp(data), cache["onnx/fp32/dit.onnx.data"][-1]]
    (copy / ".verified").write_text(json.dumps(cache))
    load_manifest(copy)
    with pytest.raises(WanError, match="does not match its sha256"):  # ... the pin is not
        load_manifest(copy, expect_sha256=good)


def test_manifest_that_is_a_fifo_is_refused(tmp_path):
    (tmp_path / "art").mkdir()
    os.mkfifo(tmp_path / "art" / "manifest.json")
    with pytest.raises(WanError, match="is a FIFO"):
        load_manifest(tmp_path / "art")
