"""runtime/files.py: renames that never replace, leftovers of killed runs, regular-file inputs."""

from __future__ import annotations

import os

import pytest

from runtime import files
from runtime.errors import WanError
from tests.conftest import dead_pid


def test_rename_noreplace_keeps_an_existing_target(tmp_path):
    for make in (lambda p: p.mkdir(), lambda p: p.write_text("theirs")):  # empty dir, file
        src, dst = tmp_path / "src", tmp_path / "dst"
        src.mkdir()
        make(dst)
        with pytest.raises(FileExistsError):
            files.rename_noreplace(src, dst)
        assert src.is_dir()
        files.remove(src)
        files.remove(dst)
    src, dst = tmp_path / "a.txt", tmp_path / "b.txt"
    src.write_text("ours")
    files.rename_noreplace(src, dst)
    assert dst.read_text() == "ours" and not src.exists()


def test_commit_without_replace_refuses_and_keeps_both(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "precious.txt").write_text("x")
    partial = files.partial_name(target)
    partial.mkdir()
    with pytest.raises(WanError, match="appeared while this run was working"):
        files.commit(partial, target, False, lambda p: None, "output", "pass --force")
    assert (target / "precious.txt").read_text() == "x" and partial.is_dir()


def test_commit_with_replace_asks_the_owner_test(tmp_path):
    target, partial = tmp_path / "out", tmp_path / "new"
    target.mkdir()
    (target / "old.txt").write_text("old")
    partial.mkdir()
    (partial / "new.txt").write_text("new")
    with pytest.raises(WanError, match="is not ours; not replaced"):
        files.commit(partial, target, True, lambda p: "is not ours", "output", "")
    assert (target / "old.txt").exists()
    files.commit(partial, target, True, lambda p: None, "output", "")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old one is gone


def test_stale_partials_of_dead_processes_are_removed(tmp_path):
    target = tmp_path / "art"
    pid = dead_pid()
    dead = [tmp_path / f".art.partial-{pid}",  # the names earlier versions used
            tmp_path / f".art.partial-{pid}-0a1b2c3d",
            files.partial_name(target).with_name(f".art.partial.{pid}.00000000.{files._HOST}")]
    for d in dead:
        d.mkdir()
        (d / "graph.onnx").write_text("half")
    stale_file = tmp_path / f".clip.mp4.partial-{pid}.mp4"
    stale_file.write_text("half a video")
    live = files.partial_name(target)  # this process: alive
    live.mkdir()
    other_host = tmp_path / f".art.partial.{pid}.00000000.ffffffff"  # not ours to judge
    other_host.mkdir()
    unrelated = tmp_path / ".art-notes"
    unrelated.mkdir()
    assert sorted(files.clean_stale(target)) == sorted(dead)
    assert live.is_dir() and other_host.is_dir() and unrelated.is_dir() and stale_file.exists()
    assert files.clean_stale(tmp_path / "clip.mp4") == [stale_file]


def test_output_set_aside_by_a_killed_run_is_restored(tmp_path):
    """Killed between 'old aside' and 'new in': the next run puts the old output back."""
    target = tmp_path / "art"
    old = tmp_path / f".art.old.{dead_pid()}.00000000.{files._HOST}"
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    files.clean_stale(target)
    assert (target / "manifest.json").exists() and not old.exists()


def test_regular_file_refuses_fifos_and_folders(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(WanError, match="is a FIFO, not a regular file"):
        files.regular_file(fifo, "reference image")  # and does not hang: nothing is opened
    with pytest.raises(WanError, match="is a directory"):
        files.regular_file(tmp_path, "config file")
    with pytest.raises(WanError, match="does not exist"):
        files.regular_file(tmp_path / "nope", "checkpoint")
    (tmp_path / "ok.json").write_text("{}")
    assert files.regular_file(tmp_path / "ok.json", "config file") == tmp_path / "ok.json"


def test_current_directory_and_root_are_never_replaced(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for place in (tmp_path, tmp_path.parent, files.absolute("/")):
        with pytest.raises(WanError, match="current directory or one of its parents"):
            files.check_replaceable_place(files.absolute(place), "output")
    files.check_replaceable_place(tmp_path / "sub", "output")
