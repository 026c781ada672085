"""Errors difstudy raises on bad input. Each message names the bad value and
what would be accepted or how to fix it."""

from __future__ import annotations

import difflib


class DifstudyError(Exception):
    """Base class of difstudy's own errors."""


class DatasetError(DifstudyError, FileNotFoundError):
    """A dataset folder is missing or malformed, or a file in it is corrupt."""


class ModelNotFoundError(DifstudyError, FileNotFoundError):
    """A model id or folder cannot be loaded (offline, missing, incomplete)."""


class UnknownActivationError(DifstudyError, KeyError):
    """An activation name that the catalogue of this U-Net does not hold."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class CacheError(DifstudyError):
    """A feature cache entry is corrupt or the cache is used inconsistently."""


def closest(name: str, valid, n: int = 5) -> list[str]:
    """The ``n`` valid names closest to ``name`` (for error messages)."""
    valid = list(valid)
    hits = difflib.get_close_matches(name, valid, n=n, cutoff=0.4)
    if len(hits) < n:
        stem = name.rsplit("-", 1)[0]
        hits += [v for v in valid if v.startswith(stem) and v not in hits][: n - len(hits)]
    return hits
