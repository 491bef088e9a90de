"""Writing an artifact directory so that it is either complete and valid or absent.

Everything is written into a hidden staging directory beside the target; the manifest (with the
sha256 of every file) is written last, then the staging directory is renamed into place. A
failed or interrupted build removes the staging directory, and a crash that skips even that
leaves only a `.NAME.partial-*` folder without a manifest, which the runtime refuses. An existing
target is replaced only with `force`, and only once the new one is complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

from runtime.errors import WanError
from runtime.manifest import MANIFEST_NAME, Manifest, sha256_file, stat_stamp, write_verified

log = logging.getLogger(__name__)


class ArtifactWriter:
    """Context manager: `with ArtifactWriter(out, force) as w:` write under `w.staging`, then
    `w.commit(manifest_without_files)` hashes the files, writes the manifest and moves in."""

    def __init__(self, target: str | os.PathLike, force: bool = False):
        self.target = Path(target)
        self.force = force
        if self.target.exists() and not force:
            raise WanError(f"output directory '{self.target}' already exists; pass --force to "
                           "replace it (it is replaced only after the new build succeeds)")
        if self.target.exists() and not self.target.is_dir():
            raise WanError(f"output '{self.target}' exists and is not a directory")
        blocker = next((p for p in self.target.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise WanError(f"cannot create '{self.target}': '{blocker}' is not a directory")
        self.staging = self.target.parent / f".{self.target.name}.partial-{os.getpid()}"
        self.created_parents: list[Path] = []  # removed again if the build fails
        self.committed = False

    def __enter__(self) -> "ArtifactWriter":
        for parent in reversed(self.target.parents):
            if not parent.exists():
                parent.mkdir()
                self.created_parents.append(parent)
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir()
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed:
            shutil.rmtree(self.staging, ignore_errors=True)
            for parent in reversed(self.created_parents):
                try:
                    parent.rmdir()
                except OSError:  # something else was put there meanwhile: keep it
                    break

    def path(self, rel: str) -> Path:
        p = self.staging / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def commit(self, manifest: Manifest) -> Manifest:
        """Hash every staged file into the manifest, write it, and move the directory in place.
        Returns the manifest as written (with its `files`)."""
        files, stamps = {}, {}
        for p in sorted(self.staging.rglob("*")):
            if p.is_file():
                rel = p.relative_to(self.staging).as_posix()
                digest = sha256_file(p)
                files[rel] = {"sha256": digest, "size": p.stat().st_size}
                stamps[rel] = digest
        manifest = dataclasses.replace(manifest, files=files)
        (self.staging / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            os.replace(self.target, old)
        os.replace(self.staging, self.target)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        # The files were just hashed: record their stamps so the first run does not hash again.
        write_verified(self.target, {rel: [*stat_stamp(self.target / rel), d] for rel, d in stamps.items()})
        log.debug("wrote %s (%d files)", self.target, len(files))
        return manifest
