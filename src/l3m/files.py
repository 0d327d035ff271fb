"""Writing results so that a reader never sees half a file: every JSON, figure and built asset goes through here."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(path: str, directory: bool = False) -> Iterator[str]:
    """Yield a staging path beside ``path`` to write a file (or, with ``directory``, a folder's files) into.

    When the block ends normally the staging path replaces ``path`` in one rename (an existing folder at ``path`` is
    removed first); when it raises, the staging path is removed and ``path`` is left as it was.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    prefix = f".{os.path.basename(path)}."
    if directory:
        staging = tempfile.mkdtemp(prefix=prefix, dir=parent)
        os.chmod(staging, 0o755)  # mkdtemp creates it private
    else:
        fd, staging = tempfile.mkstemp(prefix=prefix, suffix=os.path.splitext(path)[1], dir=parent)
        os.close(fd)
        os.chmod(staging, 0o644)
    try:
        yield staging
        if directory and os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(staging, path)
    except BaseException:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
        elif os.path.exists(staging):
            os.remove(staging)
        raise


def write_json(path: str, data) -> str:
    """Write ``data`` as indented JSON to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as staging, open(staging, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    return os.fspath(path)


def write_jsonl(path: str, rows) -> str:
    """Write one JSON record per line to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as staging, open(staging, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return os.fspath(path)
