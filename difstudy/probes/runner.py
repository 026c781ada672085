"""The progress bar the probes' training loops use (runs over seeds: :mod:`difstudy.protocols.results`)."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm.auto import tqdm


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, enabled: bool | None = None):
    """A tqdm bar; ``enabled=None`` shows it only when stderr is a terminal."""
    disable = (not sys.stderr.isatty()) if enabled is None else not enabled
    return tqdm(iterable, desc=desc, total=total, disable=disable, leave=False, mininterval=2)
