"""Scale-out: which part of the work a worker does (:class:`Shard`) and where jobs run (:func:`make_executor`).

**Shards of an extraction.** ``difstudy extract ... --shard I/N`` takes the
batches ``I, I+N, I+2N, ...`` of the dataset in its order, where batch ``j``
holds the images ``j*B .. (j+1)*B - 1`` (``B`` = ``--batch``). These are
exactly the batches a single run makes, so

- every feature is bit-identical to a single run's (a U-Net forward on CPU or
  GPU can round differently for another batch composition; the same batch
  gives the same bits),
- batch claims (see :mod:`difstudy.cache`) still apply: shards, unsharded runs
  and reruns on one cache never compute a batch twice,
- the striding balances the shards (each gets every N-th batch).

All workers of one extraction must use the same ``--batch`` and ``N`` and the
same dataset order (every loader of difstudy lists its files sorted). The
dataset-wide check for repeated image ids sees only a worker's own batches; an
id repeated across shards with different pixels is still refused, by the
cache's image digests, once the first copy is written.

``--shard auto`` reads the launcher's environment: ``RANK``/``WORLD_SIZE``
(``accelerate launch``, ``torchrun``), else ``SLURM_PROCID``/``SLURM_NTASKS``
(``srun``), else a single shard ``0/1``. No process group is initialised:
the shards do not communicate, the cache's locks and atomic writes coordinate
them. Each process uses GPU ``LOCAL_RANK`` (``SLURM_LOCALID``) unless a
device is given.

**Executors of a sweep** (:func:`make_executor`): ``submitit-local`` (jobs as
local processes) and ``slurm`` (a Slurm job array, one task per grid point),
both submitit executors configured from one :class:`JobConfig`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import DifstudyError

_SHARD_USAGE = "use I/N with 0 <= I < N (e.g. --shard 0/4), or auto"


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the batches ``j`` with ``j % count == index``."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if self.count < 1:
            raise DifstudyError(f"--shard {self}: N must be at least 1; {_SHARD_USAGE}")
        if not 0 <= self.index < self.count:
            raise DifstudyError(f"--shard {self}: I must be in 0..{self.count - 1}; {_SHARD_USAGE}")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def select(self, batches: list) -> list:
        """This shard's batches of the full list (in order)."""
        return batches[self.index :: self.count]

    @staticmethod
    def parse(spec: str | Shard | None) -> Shard:
        """``"I/N"``, ``"auto"`` (:meth:`from_env`), a :class:`Shard` or None (the whole dataset)."""
        if spec is None:
            return Shard()
        if isinstance(spec, Shard):
            return spec
        spec = str(spec).strip()
        if spec == "auto":
            return Shard.from_env()
        m = re.fullmatch(r"(-?\d+)\s*/\s*(-?\d+)", spec)
        if not m:
            raise DifstudyError(f"--shard {spec!r} is not a shard; {_SHARD_USAGE}")
        return Shard(int(m.group(1)), int(m.group(2)))

    @staticmethod
    def from_env(env: dict | None = None) -> Shard:
        """The process's shard from its launcher's variables (see the module docstring)."""
        env = os.environ if env is None else env
        for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
            if env.get(rank) is not None and env.get(world) is not None:
                try:
                    return Shard(int(env[rank]), int(env[world]))
                except ValueError as e:
                    raise DifstudyError(
                        f"--shard auto: {rank}={env[rank]!r}, {world}={env[world]!r} are not a shard ({e})"
                    ) from e
        return Shard()


def local_device(env: dict | None = None) -> str | None:
    """``cuda:<LOCAL_RANK>`` for a process of a multi-GPU launch when CUDA is available, else None."""
    env = os.environ if env is None else env
    local = env.get("LOCAL_RANK", env.get("SLURM_LOCALID"))
    if local is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return f"cuda:{int(local) % max(1, torch.cuda.device_count())}"


# -- executors ------------------------------------------------------------------------
EXECUTORS = ("local", "submitit-local", "slurm")


def parse_minutes(value) -> int:
    """Slurm time ``MM``, ``HH:MM:SS``, ``MM:SS`` or ``D-HH[:MM[:SS]]`` (or an int of minutes) -> minutes."""
    if isinstance(value, (int, float)):
        return max(1, math.ceil(value))
    text = str(value).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise DifstudyError(f"time {value!r} is not a Slurm time; use minutes (90), HH:MM:SS (1:30:00) or D-HH (1-12)")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        minutes = days * 1440 + a * 60 + (b or 0) + (c or 0) / 60
    elif c is not None:  # HH:MM:SS
        minutes = a * 60 + b + c / 60
    elif b is not None:  # MM:SS
        minutes = a + b / 60
    else:
        minutes = a
    return max(1, math.ceil(minutes))  # never less time than asked for


@dataclass(frozen=True)
class JobConfig:
    """Resources of one sweep job (one grid point): the ``slurm:`` section of a grid file or CLI flags.

    ``time``: minutes or a Slurm time (``2:00:00``); ``gpus``: GPUs per job;
    ``parallelism``: at most this many array tasks at once (Slurm ``%``);
    ``setup``: shell lines run before the job (e.g. ``module load cuda``)."""

    partition: str | None = None
    time: str | int = 60
    gpus: int = 0
    cpus: int | None = None
    mem_gb: float | None = None
    parallelism: int | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    setup: tuple[str, ...] = ()

    @staticmethod
    def from_dict(d: dict | None) -> JobConfig:
        d = dict(d or {})
        names = [f.name for f in fields(JobConfig)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            from .errors import closest

            hints = {k: closest(k, names) for k in unknown}
            raise DifstudyError(f"unknown slurm option(s) {hints} (option: closest valid names); valid: {names}")
        if "setup" in d:
            d["setup"] = (d["setup"],) if isinstance(d["setup"], str) else tuple(d["setup"] or ())
        cfg = JobConfig(**d)
        parse_minutes(cfg.time)  # validates
        return cfg

    def updated(self, **overrides) -> JobConfig:
        """A copy with the given (non-None) values replaced, e.g. CLI flags over the grid file."""
        return JobConfig.from_dict({**vars(self), **{k: v for k, v in overrides.items() if v is not None}})

    def submitit_parameters(self, kind: str) -> dict:
        """Parameters for ``executor.update_parameters`` of submitit's executor ``kind``."""
        params: dict = dict(timeout_min=parse_minutes(self.time))
        if kind == "slurm":
            params["name"] = "difstudy-sweep"
            if self.gpus:
                params["gpus_per_node"] = int(self.gpus)
            if self.cpus:
                params["cpus_per_task"] = int(self.cpus)
            if self.mem_gb:
                params["mem_gb"] = float(self.mem_gb)
            for k in ("partition", "account", "qos", "constraint"):
                if getattr(self, k):
                    params[f"slurm_{k}"] = getattr(self, k)
            if self.parallelism:
                params["slurm_array_parallelism"] = int(self.parallelism)
            if self.setup:
                params["slurm_setup"] = list(self.setup)
        return params


def make_executor(kind: str, folder: str | Path, config: JobConfig | None = None):
    """A submitit executor: ``submitit-local`` (LocalExecutor) or ``slurm`` (a Slurm job array)."""
    if kind not in ("submitit-local", "slurm"):
        raise DifstudyError(f"executor {kind!r} is not a submitit executor; use submitit-local or slurm")
    try:
        import submitit
    except ImportError as e:  # pragma: no cover - a dependency of difstudy
        raise DifstudyError(f"--executor {kind} needs submitit: pip install submitit ({e})") from e
    cluster = "local" if kind == "submitit-local" else "slurm"
    try:
        ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    except RuntimeError as e:  # no srun on PATH
        raise DifstudyError(f"--executor slurm: {e} (run the sweep on a login node of the cluster)") from e
    ex.update_parameters(**(config or JobConfig()).submitit_parameters(kind))
    return ex
