"""Output locations checked before any work: every path a run will write (--checkpoint-dir,
--log-json, --tensorboard) must be writable before the first step - and, through
`meshplan train`'s pre-check, before torchrun starts a rank - so that no run loses its
steps to a location it cannot write at the first save or log line.

A directory that exists is probed by creating (and at once dropping) an unnamed file in
it, which answers for permissions, read-only mounts and root alike; one that does not
exist yet is probed the same way in its nearest existing ancestor, which must be a
directory. Nothing visible is created or changed.
"""
from __future__ import annotations

import os
from pathlib import Path

from cost_models.errors import MeshplanError
from cost_models.inputs import refuses_new_files


def _probe(directory: Path, flag: str, target: str):
    refused = refuses_new_files(directory)
    if refused:
        raise MeshplanError(f"{flag} {target!r} cannot be written: {directory} refuses new files ({refused})")


def check_directory(path: str, flag: str):
    """`path` is, or can be created as, a writable directory."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise MeshplanError(f"{flag} {path!r} is a file, not a directory")
    ancestor = p
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise MeshplanError(f"{flag} {path!r} cannot be created: {str(ancestor)!r} is a file, not a directory")
    _probe(ancestor, flag, path)


def check_file(path: str, flag: str):
    """`path` can be appended to: an existing writable file, or a new file in an existing,
    writable directory."""
    p = Path(path)
    if p.is_dir():
        raise MeshplanError(f"{flag} {path!r} is a directory, not a file")
    if not p.parent.is_dir():
        raise MeshplanError(f"{flag} {path!r} cannot be written: directory {str(p.parent)!r} does not exist")
    if p.exists():
        if not os.access(p, os.W_OK):
            raise MeshplanError(f"{flag} {path!r} cannot be written (permission denied)")
        try:
            open(p, "ab").close()       # appends nothing, changes nothing
        except OSError as exc:
            raise MeshplanError(f"{flag} {path!r} cannot be written: {exc.strerror or exc}")
    else:
        _probe(p.parent, flag, path)
