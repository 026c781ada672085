"""The one atomic-write helper: a file is written under a temporary name beside
its destination, flushed to disk, then moved into place with :func:`os.replace`.

Readers (and a process killed mid-write) therefore see either the old file or
the complete new one, never half a file. The temporary name carries the
process id and a random suffix, so concurrent writers never share it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pandas as pd


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], fsync: bool = True) -> Path:
    """Create ``path`` by calling ``write(file)`` on a temporary sibling opened in binary
    mode, then renaming it; on any error the temporary file is removed. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_csv_atomic(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """``df.to_csv(index=False)`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(df.to_csv(index=False).encode("utf-8")))
