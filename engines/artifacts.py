"""Writing an artifact directory so that it is either complete and valid or absent.

Everything is written into a hidden partial directory beside the target (runtime/files.py); the
manifest (with the sha256 of every file) is written last, then the directory is moved into place
with a rename that never replaces anything. A failed or interrupted build (Ctrl+C, SIGTERM)
removes the partial directory; one that was killed leaves it, and the next build to the same
target removes it. Without `force` an existing target is never touched, even one that appears
while the build runs (a concurrent build's, the user's); with `force` only an artifact directory
holding nothing but what wan-export wrote is replaced, and only once the new one is complete.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
from pathlib import Path

from runtime.errors import WanError
from runtime.files import (absolute, check_replaceable_place, check_writable_dir, clean_stale, commit,
                           environment_error, exists, partial_name, remove)
from runtime.manifest import (MANIFEST_NAME, Manifest, not_an_artifact_dir, sha256_file, stat_stamp,
                              write_verified)

log = logging.getLogger(__name__)

WHAT = "output directory"
FORCE_HINT = "--force replaces only an artifact directory written by wan-export"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class ArtifactWriter:
    """Context manager: `with ArtifactWriter(out, force) as w:` write under `w.staging`, then
    `w.commit(manifest_without_files)` hashes the files, writes the manifest and moves in."""

    def __init__(self, target: str | os.PathLike, force: bool = False):
        self.target = absolute(target)
        self.force = force
        blocker = next((p for p in self.target.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise WanError(f"cannot create '{self.target}': '{blocker}' is not a directory")
        check_writable_dir(next(p for p in self.target.parents if p.exists()), "output folder")
        if exists(self.target):
            if not force:
                raise WanError(f"{WHAT} '{target}' already exists; pass --force to replace it (it is "
                               "replaced only after the new build succeeds)")
            check_replaceable_place(self.target, WHAT)
            why = not_an_artifact_dir(self.target)
            if why is not None:
                raise WanError(f"{WHAT} '{target}' {why}; not replaced ({FORCE_HINT})")
        self.staging = partial_name(self.target)
        self.created_parents: list[Path] = []  # removed again if the build fails
        self.committed = False

    def __enter__(self) -> "ArtifactWriter":
        for parent in reversed(self.target.parents):
            if not parent.exists():
                parent.mkdir()
                self.created_parents.append(parent)
        clean_stale(self.target)  # partials of builds that were killed
        os.mkdir(self.staging)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            if exists(self.staging):
                remove(self.staging)
            for parent in reversed(self.created_parents):
                try:
                    parent.rmdir()
                except OSError:  # something else was put there meanwhile: keep it
                    break
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise environment_error(exc, "the artifact directory", self.target) from None

    def path(self, rel: str) -> Path:
        p = self.staging / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def commit(self, manifest: Manifest) -> Manifest:
        """Hash every staged file into the manifest, write it, and move the directory in place.
        Returns the manifest as written (with its `files`)."""
        files, stamps = {}, {}
        # Some writers create 0600 files (onnx's external data); a shared artifact directory
        # must be readable by whoever the user's umask lets read their other files.
        file_mode, dir_mode = 0o666 & ~_umask(), 0o777 & ~_umask()
        for p in sorted(self.staging.rglob("*")):
            os.chmod(p, dir_mode if p.is_dir() else file_mode)
            if p.is_file():
                rel = p.relative_to(self.staging).as_posix()
                digest = sha256_file(p)
                files[rel] = {"sha256": digest, "size": p.stat().st_size}
                stamps[rel] = digest
        manifest = dataclasses.replace(manifest, files=files)
        (self.staging / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
        os.chmod(self.staging / MANIFEST_NAME, file_mode)
        commit(self.staging, self.target, self.force, not_an_artifact_dir, WHAT,
               "pass --force to replace an artifact directory, or choose another --out")
        self.committed = True
        # The files were just hashed: record their stamps so the first run does not hash again.
        write_verified(self.target, {rel: [*stat_stamp(self.target / rel), d] for rel, d in stamps.items()})
        log.debug("wrote %s (%d files)", self.target, len(files))
        return manifest
