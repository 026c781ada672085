"""Out-of-core feature cache.

Format: a folder of **safetensors shards**, each with a JSON sidecar::

    <root>/<group>/shards/<batch-key>-<uuid>.safetensors   tensors "act|t|variant|seed|image_id" -> (C, H, W)
    <root>/<group>/shards/<batch-key>-<uuid>.json          entries, sha256 of the shard file, sizes, and the
                                                          content digest of each image it holds ("images")
    <root>/<group>/group.json                             what the group is (model, image size, dtype)
    <root>/<group>/quarantine/                            shards that failed their checksum (kept, never deleted)

Why safetensors rather than zarr: it is already the field's weight format (no
extra dependency), readers memory-map single tensors without loading a shard,
and a shard is written once and never mutated, which makes crash safety
simple: the shard goes to a temporary name and is renamed into place, then the
sidecar is written the same way. A shard counts only once its sidecar exists
and its sha256 matches, so a SIGKILL at any moment leaves either a complete
entry or nothing; truncated or corrupt shards are detected, moved to
``quarantine/`` with a warning, and their entries recomputed.

Image digests: a sidecar records, for each image id of its shard, a digest of
the image's pixels; :meth:`FeatureCache.image_digest` answers it, so a writer
can refuse an id that the cache already holds for another image (two datasets
that name different images alike would otherwise share features silently).

Concurrency: writers never share a file. Each extraction batch is claimed
through a lock file (``filelock``) so two processes on one cache split the
work instead of duplicating it; readers see a shard only after it is complete.
Memory is bounded by one batch: shards are written as batches finish.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from filelock import FileLock, Timeout
from safetensors import safe_open
from safetensors.torch import save

from .errors import CacheError

SEP = "|"


@dataclass(frozen=True, order=True)
class Key:
    """One cached feature map."""

    activation: str
    t: int
    variant: str
    seed: int
    image_id: str

    def encode(self) -> str:
        for part in (self.activation, self.variant, self.image_id):
            if SEP in part:
                raise CacheError(f"{part!r} contains {SEP!r}, which the cache uses as a separator")
        return SEP.join((self.activation, str(self.t), self.variant, str(self.seed), self.image_id))

    @staticmethod
    def decode(s: str) -> Key:
        a, t, v, seed, i = s.split(SEP, 4)
        return Key(a, int(t), v, int(seed), i)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class FeatureCache:
    """One group of a feature cache (one model, image size and storage dtype).

    ``FeatureCache(root, group, meta)``: ``meta`` describes the group and is
    written to ``group.json`` on first use; reopening with a different
    ``meta`` is an error (features of two models must not mix).
    """

    def __init__(self, root: str | os.PathLike, group: str, meta: dict | None = None):
        self.dir = Path(root) / group
        self.shards_dir = self.dir / "shards"
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "locks").mkdir(exist_ok=True)
        info = self.dir / "group.json"
        if meta is not None:
            if info.exists():
                old = json.loads(info.read_text())
                if old != meta:
                    raise CacheError(
                        f"cache group {self.dir} was written for {old}, not {meta}; use another --cache folder"
                    )
            else:
                _atomic_write_text(info, json.dumps(meta, indent=2, sort_keys=True))
        self.meta = json.loads(info.read_text()) if info.exists() else {}
        self._index: dict[Key, Path] = {}
        self._sidecar_keys: dict[str, list[Key]] = {}
        self._sidecar_images: dict[str, dict[str, str]] = {}
        self._images: dict[str, str] = {}
        self._verified: set[Path] = set()
        self.refresh()

    # -- index -----------------------------------------------------------
    def refresh(self) -> None:
        """See shards written (or quarantined) by other processes since the last call.

        Incremental: only sidecars not seen before are parsed, so calling it
        once per batch stays cheap on caches with thousands of shards."""
        sides = {p.name: p for p in self.shards_dir.glob("*.json")}
        gone = set(self._sidecar_keys) - set(sides)
        if gone:  # quarantined elsewhere: drop their entries
            for name in gone:
                self._forget(name)
            self._rebuild_index()
        for name in sorted(set(sides) - set(self._sidecar_keys)):
            side = sides[name]
            try:
                info = json.loads(side.read_text())
                keys = [Key.decode(k) for k in info["keys"]]
                images = {str(k): str(v) for k, v in info.get("images", {}).items()}
            except (json.JSONDecodeError, KeyError, ValueError, OSError, AttributeError):
                warnings.warn(f"feature cache: unreadable sidecar {side}; quarantined, its entries will be recomputed")
                self._quarantine(side.with_suffix(".safetensors"), side)
                continue
            self._add(name, keys, images)

    def _add(self, side_name: str, keys: list[Key], images: dict[str, str]) -> None:
        self._sidecar_keys[side_name] = keys
        self._sidecar_images[side_name] = images
        shard = self.shards_dir / side_name.replace(".json", ".safetensors")
        for k in keys:
            self._index.setdefault(k, shard)
        for i, d in images.items():
            self._images.setdefault(i, d)

    def _forget(self, side_name: str) -> None:
        self._sidecar_keys.pop(side_name, None)
        self._sidecar_images.pop(side_name, None)

    def _rebuild_index(self) -> None:
        self._index, self._images = {}, {}
        for name in sorted(self._sidecar_keys):
            shard = self.shards_dir / name.replace(".json", ".safetensors")
            for k in self._sidecar_keys[name]:
                self._index.setdefault(k, shard)
            for i, d in self._sidecar_images.get(name, {}).items():
                self._images.setdefault(i, d)

    def __contains__(self, key: Key) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> list[Key]:
        return sorted(self._index)

    def entries(self) -> pd.DataFrame:
        """Tidy table of cached entries (one row per feature map)."""
        rows = [dict(vars(k), shard=p.name) for k, p in self._index.items()]
        return pd.DataFrame(rows, columns=["activation", "t", "variant", "seed", "image_id", "shard"])

    def missing(self, keys) -> list[Key]:
        return [k for k in keys if k not in self._index]

    def image_digest(self, image_id: str) -> str | None:
        """Content digest recorded for ``image_id`` by the writer of its features (None if unknown)."""
        return self._images.get(image_id)

    # -- integrity -------------------------------------------------------
    def _quarantine(self, *paths: Path) -> None:
        q = self.dir / "quarantine"
        q.mkdir(exist_ok=True)
        for p in paths:
            if p.exists():
                os.replace(p, q / p.name)

    def check_shard(self, shard: Path) -> bool:
        """sha256 of ``shard`` against its sidecar; a bad shard is quarantined (with a warning)."""
        if shard in self._verified:
            return True
        side = shard.with_suffix(".json")
        try:
            ok = shard.exists() and json.loads(side.read_text())["sha256"] == _sha256(shard)
        except (OSError, json.JSONDecodeError, KeyError):
            ok = False
        if ok:
            self._verified.add(shard)
            return True
        warnings.warn(
            f"feature cache: shard {shard.name} is corrupt or truncated (checksum mismatch); quarantined, its entries will be recomputed"
        )
        self._quarantine(shard, side)
        self._forget(side.name)
        self._rebuild_index()
        return False

    def verify(self) -> list[str]:
        """Check every shard; returns the names of those quarantined."""
        bad = [p.name for p in sorted(set(self._index.values())) if not self.check_shard(p)]
        self.refresh()
        return bad

    # -- reading ---------------------------------------------------------
    def get(self, key: Key) -> torch.Tensor:
        """The cached tensor for ``key`` (as stored, e.g. float16)."""
        shard = self._index.get(key)
        if shard is None:
            raise KeyError(f"{key} is not in the feature cache {self.dir}; run `difstudy extract` for it first")
        if not self.check_shard(shard):
            raise CacheError(f"{key} was in a corrupt shard ({shard.name}, now quarantined); extract it again")
        with safe_open(shard, framework="pt") as f:
            return f.get_tensor(key.encode())

    def load(self, activation: str, image_ids, t: int, variant: str, seed: int) -> torch.Tensor:
        """Stack (N, C, H, W) for several images (small N; stream for large sets)."""
        return torch.stack([self.get(Key(activation, t, variant, seed, i)) for i in image_ids])

    # -- writing ---------------------------------------------------------
    def claim(self, batch_key: str) -> FileLock | None:
        """Try to claim a batch for computation; None if another process holds it."""
        lock = FileLock(str(self.dir / "locks" / f"{batch_key}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return None
        return lock

    def write(
        self,
        batch_key: str,
        tensors: dict[Key, torch.Tensor],
        extra: dict | None = None,
        images: dict[str, str] | None = None,
    ) -> Path:
        """Write one shard atomically (shard first, sidecar last).

        ``images``: content digest per image id of the shard, recorded in the sidecar
        (see :meth:`image_digest`). The checksum is taken of the bytes in memory, so
        the shard is not read back."""
        stem = f"{batch_key}-{uuid.uuid4().hex[:8]}"
        shard = self.shards_dir / f"{stem}.safetensors"
        tmp = self.shards_dir / f".{stem}.safetensors.tmp"
        payload = {k.encode(): v.detach().contiguous().cpu() for k, v in tensors.items()}
        data = save(payload)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, shard)
        images = dict(images or {})
        digest = hashlib.sha256(data).hexdigest()
        info = dict(keys=sorted(payload), sha256=digest, bytes=len(data), images=images, **(extra or {}))
        _atomic_write_text(shard.with_suffix(".json"), json.dumps(info))
        self._verified.add(shard)
        self._add(shard.with_suffix(".json").name, list(tensors), images)
        return shard

    def summary(self) -> dict:
        shards = set(self._index.values())
        return dict(
            entries=len(self._index), shards=len(shards), bytes=sum(p.stat().st_size for p in shards if p.exists())
        )
