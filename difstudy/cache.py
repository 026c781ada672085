"""Out-of-core feature cache.

Format: a folder of **safetensors shards**, each with a JSON sidecar::

    <root>/<group>/shards/<batch-key>-<uuid>.safetensors   tensors "act|t|variant|seed|image_id" -> (C, H, W)
    <root>/<group>/shards/<batch-key>-<uuid>.json          entries, sha256 of the shard file, sizes, and the
                                                          content digest of each image it holds ("images")
    <root>/<group>/group.json                             what the group is (model, image size, dtype)
    <root>/<group>/quarantine/                            shards that failed their checksum (kept, never deleted)
    <root>/<group>/requests/<digest>.json                 what an extraction asked for: activations, timesteps,
                                                          variants, seed, number of images, batch size, dataset
    <root>/<group>/requests/<digest>/<batch>.json         the image ids of batch ``<batch>`` of that request

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

Requests: :func:`difstudy.extract.extract` records what it was asked for
before its first batch, and the image ids of each batch as it reaches it, so
the cache knows what it *should* hold: :func:`verify_cache` reports, per
activation, timestep and variant, the entries expected (images of the
request) against those present, and finds corrupt entries (a shard that fails
its checksum, cannot be parsed or is missing; a tensor of the wrong shape or
dtype). ``repair=True`` quarantines corrupt shards (a checksum covers a
shard, not single tensors, so every entry of a shard whose bytes changed is
suspect) and rewrites a shard with wrong-shaped tensors without them; good
entries are never changed, and the next extraction recomputes what is gone.

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
from collections import Counter
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


def _quarantine(group_dir: Path, *paths: Path) -> None:
    q = Path(group_dir) / "quarantine"
    q.mkdir(exist_ok=True)
    for p in paths:
        if p.exists():
            os.replace(p, q / p.name)


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
        self._handles: dict[Path, object] = {}  # open shards, least recently read first
        self.refresh()

    # an open shard is read without parsing its header again (reading one activation of one image
    # at a time, as single-activation ranking does, opened a shard per read: 0.3 ms against 0.02)
    OPEN_SHARDS = 64

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}  # open files do not travel to other processes

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
        self._index, self._images, self._handles = {}, {}, {}
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
        for p in paths:
            self._handles.pop(p, None)
        _quarantine(self.dir, *paths)

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
        return self._open(shard).get_tensor(key.encode())

    def _open(self, shard: Path):
        handle = self._handles.pop(shard, None)
        if handle is None:
            handle = safe_open(shard, framework="pt")
        self._handles[shard] = handle
        while len(self._handles) > self.OPEN_SHARDS:
            self._handles.pop(next(iter(self._handles)))
        return handle

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

    # -- requests ----------------------------------------------------------
    def record_request(self, spec: dict) -> str:
        """Record what an extraction asks for (JSON-able ``spec``); returns its digest.

        Every shard of one extraction records the same spec, hence the same file."""
        text = json.dumps(spec, sort_keys=True, default=str)
        digest = hashlib.sha1(text.encode()).hexdigest()[:12]
        path = self.dir / "requests" / f"{digest}.json"
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            _atomic_write_text(path, text)
        return digest

    def record_batch(self, request: str, batch: int, image_ids) -> None:
        """Record the image ids of batch number ``batch`` of ``request`` (once)."""
        path = self.dir / "requests" / request / f"{int(batch):06d}.json"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(path, json.dumps(list(map(str, image_ids))))

    def summary(self) -> dict:
        shards = set(self._index.values())
        return dict(
            entries=len(self._index), shards=len(shards), bytes=sum(p.stat().st_size for p in shards if p.exists())
        )


# -- verification ----------------------------------------------------------------------
_ST_DTYPES = {"float16": "F16", "float32": "F32", "bfloat16": "BF16", "float64": "F64"}
COMPLETENESS_COLUMNS = ["group", "request", "dataset", "activation", "t", "variant", "seed", "expected", "present"]
CORRUPT_COLUMNS = ["group", "shard", "entries", "reason", "action"]


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify_cache` found: tidy ``completeness`` (one row per request, activation, t,
    variant and seed), ``corrupt`` (one row per corrupt shard), duplicated entries, and whether
    corrupt shards were repaired."""

    completeness: pd.DataFrame
    corrupt: pd.DataFrame
    duplicates: int
    repaired: bool

    @property
    def complete(self) -> bool:
        c = self.completeness
        return bool((c["present"] >= c["expected"]).all())

    @property
    def ok(self) -> bool:
        """Nothing corrupt is left in the cache."""
        return self.corrupt.empty or self.repaired


def cache_groups(path: str | os.PathLike) -> list[Path]:
    """The group folders of a cache root, or ``[path]`` when ``path`` is a group itself."""
    path = Path(path)
    if not path.is_dir():
        raise CacheError(f"feature cache {path} does not exist (give the --cache folder of `difstudy extract`)")
    if (path / "group.json").exists() or (path / "shards").is_dir():
        return [path]
    groups = sorted(p for p in path.iterdir() if (p / "group.json").exists() or (p / "shards").is_dir())
    if not groups:
        raise CacheError(f"{path} holds no feature cache group (no */group.json); is it the --cache folder?")
    return groups


def _inspect_shard(shard: Path, info: dict, dtype: str | None) -> tuple[str | None, dict[str, tuple]]:
    """(reason the shard is corrupt or None, {key: shape} of its tensors)."""
    if not shard.exists():
        return "shard file missing (its sidecar exists)", {}
    size = shard.stat().st_size
    if "bytes" in info and size != info["bytes"]:
        return f"truncated or overwritten: {size} bytes, the sidecar says {info['bytes']}", {}
    if _sha256(shard) != info.get("sha256"):
        return "checksum mismatch (sha256 differs from the sidecar's)", {}
    try:
        with safe_open(shard, framework="pt") as f:
            names = set(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in names}
            dtypes = {k: f.get_slice(k).get_dtype() for k in names}
    except Exception as e:  # safetensors raises its own error types
        return f"unreadable safetensors file ({type(e).__name__}: {e})", {}
    if names != set(info["keys"]):
        return f"holds {len(names)} tensors, the sidecar lists {len(info['keys'])}", {}
    want = _ST_DTYPES.get(dtype or "")
    bad = sorted(k for k, d in dtypes.items() if want and d != want)
    if bad:
        return f"{len(bad)} tensor(s) stored as {dtypes[bad[0]]}, the group's dtype is {dtype} (e.g. {bad[0]})", {}
    return None, shapes


def _verify_group(gdir: Path, repair: bool) -> tuple[list[dict], list[dict], int]:
    meta = json.loads((gdir / "group.json").read_text()) if (gdir / "group.json").exists() else {}
    shards_dir = gdir / "shards"
    corrupt: list[dict] = []
    good: dict[str, dict[Key, tuple]] = {}  # sidecar name -> {key: shape}
    infos: dict[str, dict] = {}
    for side in sorted(shards_dir.glob("*.json")):
        shard = side.with_suffix(".safetensors")
        try:
            info = json.loads(side.read_text())
            keys = [Key.decode(k) for k in info["keys"]]
        except (json.JSONDecodeError, KeyError, ValueError, OSError, AttributeError) as e:
            corrupt.append(dict(shard=shard.name, entries=0, reason=f"unreadable sidecar ({type(e).__name__})"))
            continue
        reason, shapes = _inspect_shard(shard, info, meta.get("dtype"))
        if reason:
            corrupt.append(dict(shard=shard.name, entries=len(keys), reason=reason))
            continue
        good[side.name] = {Key.decode(k): s for k, s in shapes.items()}
        infos[side.name] = info
    # wrong shape: every entry of an activation has one shape in a group (one model, one image size)
    by_act: dict[str, dict[tuple, int]] = {}
    for shapes in good.values():
        for k, s in shapes.items():
            by_act.setdefault(k.activation, {}).setdefault(s, 0)
            by_act[k.activation][s] += 1
    usual = {a: max(c, key=lambda s: (c[s], s)) for a, c in by_act.items()}
    reshape: dict[str, list[Key]] = {}
    for name, shapes in good.items():
        wrong = sorted(k for k, s in shapes.items() if len(s) != 3 or s != usual[k.activation])
        if wrong:
            k = wrong[0]
            reshape[name] = wrong
            corrupt.append(
                dict(
                    shard=name.replace(".json", ".safetensors"),
                    entries=len(wrong),
                    reason=f"{len(wrong)} tensor(s) of the wrong shape, e.g. {k.activation} {shapes[k]} "
                    f"where the group's others are {usual[k.activation]}",
                )
            )
    for name in reshape:  # the shard's good entries stay, the wrong-shaped ones are dropped
        good[name] = {k: s for k, s in good[name].items() if k not in reshape[name]}
    if repair:
        for row in corrupt:
            shard = shards_dir / row["shard"]
            side = shard.with_suffix(".json")
            if side.name in reshape:
                _rewrite_without(gdir, shard, infos[side.name], reshape[side.name])
                row["action"] = "rewritten without the wrong-shaped tensors"
            else:
                _quarantine(gdir, shard, side)
                row["action"] = "quarantined"
    counts: dict[Key, int] = {}
    for shapes in good.values():
        for k in shapes:
            counts[k] = counts.get(k, 0) + 1
    duplicates = sum(c - 1 for c in counts.values())
    return _completeness(gdir, set(counts)), corrupt, duplicates


def _rewrite_without(gdir: Path, shard: Path, info: dict, drop: list[Key]) -> None:
    """Write the shard's other tensors to a new shard (atomically, as a writer does), then quarantine it."""
    from safetensors.torch import load_file

    keep = {Key.decode(k): v for k, v in load_file(shard).items() if Key.decode(k) not in set(drop)}
    cache = FeatureCache(gdir.parent, gdir.name)
    images = {i: d for i, d in info.get("images", {}).items() if any(k.image_id == i for k in keep)}
    extra = {k: v for k, v in info.items() if k not in ("keys", "sha256", "bytes", "images")}
    if keep:
        cache.write(shard.stem.rsplit("-", 1)[0], keep, extra=extra, images=images)
    _quarantine(gdir, shard, shard.with_suffix(".json"))


def _completeness(gdir: Path, present: set[Key]) -> list[dict]:
    rows = []
    req_dir = gdir / "requests"
    for rfile in sorted(req_dir.glob("*.json")) if req_dir.is_dir() else []:
        try:
            spec = json.loads(rfile.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        ids: set[str] = set()
        for b in sorted((req_dir / rfile.stem).glob("*.json")):
            try:
                ids.update(json.loads(b.read_text()))
            except (json.JSONDecodeError, OSError):
                continue
        for a in spec["activations"]:
            for t in spec["timesteps"]:
                for v in spec["variants"]:
                    n = sum(Key(a, int(t), v, int(spec["seed"]), i) in present for i in ids)
                    rows.append(
                        dict(
                            request=rfile.stem,
                            dataset=spec.get("dataset", ""),
                            activation=a,
                            t=int(t),
                            variant=v,
                            seed=int(spec["seed"]),
                            expected=int(spec["n_images"]),
                            present=n,
                        )
                    )
    if not rows and present:  # a cache written before requests were recorded: every image it holds is expected
        per_seed = Counter(seed for seed, _ in {(k.seed, k.image_id) for k in present})
        combos = Counter((k.activation, k.t, k.variant, k.seed) for k in present)
        for (a, t, v, seed), n in sorted(combos.items()):
            row = dict(activation=a, t=t, variant=v, seed=seed, expected=per_seed[seed], present=n)
            rows.append(dict(request="", dataset="(no request records)", **row))
    return rows


def verify_cache(path: str | os.PathLike, repair: bool = False) -> VerifyReport:
    """Check a feature cache (a ``--cache`` root or one group folder); see the module docstring.

    Reads every shard once (sha256, safetensors header). With ``repair``, corrupt
    shards are quarantined (wrong-shaped tensors dropped from a rewritten copy);
    a rerun of the same extraction then recomputes exactly what they held."""
    completeness, corrupt, duplicates = [], [], 0
    for gdir in cache_groups(path):
        comp, bad, dup = _verify_group(gdir, repair)
        completeness += [dict(group=gdir.name, **r) for r in comp]
        corrupt += [dict(group=gdir.name, action=r.pop("action", "none"), **r) for r in bad]
        duplicates += dup
    return VerifyReport(
        pd.DataFrame(completeness, columns=COMPLETENESS_COLUMNS),
        pd.DataFrame(corrupt, columns=CORRUPT_COLUMNS),
        duplicates,
        repair,
    )
