"""``difstudy data prepare NAME --root DIR``: put a real dataset in its official layout under one
data root, downloaded from its official source where the network allows, verified, or else an
error that says exactly what to place where.

Every dataset lands in its own folder under the root (:data:`DATASETS`: ``<root>/SPair-71k``,
``<root>/ddpm-segmentation/horse_21``, ``<root>/ADEChallengeData2016``,
``<root>/cifar-10-batches-py``, ``<root>/cityscapes``), where the loaders of
:mod:`difstudy.data.loaders` read it. Steps, each safe to interrupt and rerun:

1. already in place: the loader opens every split: nothing is downloaded;
2. download the official archive to ``<root>/.downloads/<archive>.part`` (a progress bar), then
   check its checksum where one is published (CIFAR-10's MD5 from its page, ADE20K's SHA-1 from
   GluonCV's preparation script); a mismatch deletes the download and names both digests;
3. extract into ``<root>/.downloads/<name>.extract``, refusing members that would land outside
   it, and move the dataset folder into place in one rename;
4. verify the layout by opening every split with its loader, and count the items.

Where a download cannot be made (no network, a login such as Cityscapes', an archive whose
layout needs a manual step) the error gives the official page, the archive, the folder it must
end up in and the layout the loader expects; rerunning the command then verifies it.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from difstudy.data import loaders as L
from difstudy.errors import DatasetError


@dataclass(frozen=True)
class Source:
    """Where a dataset comes from and where it goes under the data root."""

    name: str
    kind: str  # loader kind (difstudy.data.loaders.load_dataset)
    folder: str  # below the data root: what the loader is given as its root
    splits: tuple[str, ...]
    page: str  # the official page
    url: str | None = None  # the official archive (None: needs a login or a manual step)
    archive: str | None = None
    digest: tuple[str, str] | None = None  # (hashlib algorithm, hex) where one is published
    inside: str = ""  # the dataset folder inside the extracted archive
    layout: str = ""  # what the loader expects, for the manual steps
    manual: str = ""  # extra manual steps
    loader_kw: dict[str, Any] = field(default_factory=dict)


DATASETS: dict[str, Source] = {
    s.name: s
    for s in (
        Source(
            "spair",
            "spair",
            "SPair-71k",
            ("trn", "val", "test"),
            L.SPAIR_URL,
            "https://cvlab.postech.ac.kr/research/SPair-71k/data/SPair-71k.tar.gz",
            "SPair-71k.tar.gz",
            None,  # no checksum is published: verified by its layout
            "SPair-71k",
            "JPEGImages/<category>/*.jpg, PairAnnotation/{trn,val,test}/*.json, Layout/large/*.txt",
        ),
        Source(
            "horse21",
            "horse21",
            "ddpm-segmentation/horse_21",
            ("train", "test"),
            L.DDPMSEG_URL,
            "https://storage.yandexcloud.net/yandex-research/ddpm-segmentation/datasets.tar.gz",
            "ddpm-segmentation-datasets.tar.gz",
            None,
            "horse_21",
            "real/{train,test}/*.png|jpg with a .npy mask beside each image",
        ),
        Source(
            "bedroom28",
            "bedroom28",
            "ddpm-segmentation/bedroom_28",
            ("train", "test"),
            L.DDPMSEG_URL,
            "https://storage.yandexcloud.net/yandex-research/ddpm-segmentation/datasets.tar.gz",
            "ddpm-segmentation-datasets.tar.gz",
            None,
            "bedroom_28",
            "real/{train,test}/*.png|jpg with a .npy mask beside each image",
        ),
        Source(
            "ade20k",
            "ade20k",
            "ADEChallengeData2016",
            ("training", "validation"),
            L.ADE20K_URL,
            "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
            "ADEChallengeData2016.zip",
            ("sha1", "219e1696abb36c8ba3a3afe7fb2f4b4606a897c7"),  # GluonCV scripts/datasets/ade20k.py
            "ADEChallengeData2016",
            "images/{training,validation}/*.jpg and annotations/{training,validation}/*.png",
        ),
        Source(
            "cifar10",
            "cifar10",
            "cifar-10-batches-py",
            ("train", "test"),
            L.CIFAR10_URL,
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            "cifar-10-python.tar.gz",
            ("md5", "c58f30108f718f92721af3b95e74349a"),  # the official page's MD5
            "cifar-10-batches-py",
            "data_batch_1..5, test_batch, batches.meta",
        ),
        Source(
            "cityscapes",
            "cityscapes",
            "cityscapes",
            ("train", "val"),
            L.CITYSCAPES_URL,
            layout="leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png",
            manual="the download needs a login: unzip leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip "
            "into the folder, then run cityscapesscripts' createTrainIdLabelImgs (CITYSCAPES_DATASET=<folder>)",
        ),
    )
}


def _source(name: str) -> Source:
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; `difstudy data prepare` knows {', '.join(DATASETS)}")
    return DATASETS[name]


def target(name: str, root: str | Path) -> Path:
    """The folder dataset ``name`` occupies under the data ``root``."""
    return Path(root) / _source(name).folder


def verify(name: str, root: str | Path) -> dict[str, int]:
    """Open every split of ``name`` under ``root`` with its loader: ``{split: items}``; a missing or
    malformed folder raises the loader's :class:`DatasetError` (path, expected layout, source)."""
    src = _source(name)
    folder = target(name, root)
    return {s: len(L.load_dataset(src.kind, folder, split=s, **src.loader_kw)) for s in src.splits}


def manual_steps(name: str, root: str | Path, why: str) -> str:
    """What to place where, when ``prepare`` cannot download ``name`` itself."""
    src = _source(name)
    folder = target(name, root)
    lines = [f"{name}: {why}", f"  official page: {src.page}"]
    if src.url:
        lines.append(f"  archive: {src.url}")
        if src.digest:
            lines.append(f"  its {src.digest[0]}: {src.digest[1]}")
        inside = f" (the archive's {src.inside}/ folder)" if src.inside else ""
        lines.append(f"  extract it so that {folder}{inside} holds: {src.layout}")
    else:
        lines.append(f"  place it in {folder}: {src.layout}")
    if src.manual:
        lines.append(f"  {src.manual}")
    lines.append(f"  then verify: difstudy data prepare {name} --root {root}")
    return "\n".join(lines)


def _download(url: str, part: Path, progress: bool, timeout: float) -> None:
    part.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as f:
        total = int(r.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=part.name, disable=not progress) as bar:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _extract(archive: Path, into: Path) -> None:
    """Extract ``archive`` into ``into``; members that would land outside it are refused."""
    into.mkdir(parents=True, exist_ok=True)
    base = into.resolve()
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for m in z.namelist():
                if not (base / m).resolve().is_relative_to(base):
                    raise DatasetError(f"{archive}: member {m!r} would land outside {into}; not extracting it")
            z.extractall(into)
        return
    try:
        with tarfile.open(archive) as t:
            t.extractall(into, filter="data")  # refuses absolute paths, .. and links outside
    except tarfile.FilterError as e:
        raise DatasetError(f"{archive}: {e} (a member would land outside {into}); not extracting it") from e
    except (tarfile.TarError, EOFError) as e:
        raise DatasetError(f"{archive} is not a readable tar or zip archive ({e}); delete it and rerun") from e


def prepare(
    name: str, root: str | Path, download: bool = True, progress: bool = True, timeout: float = 60.0
) -> dict[str, int]:
    """Put dataset ``name`` in place under ``root`` (see the module docstring) and return its item
    counts per split. Raises :class:`DatasetError` with :func:`manual_steps` when it cannot."""
    src = _source(name)
    root = Path(root)
    folder = target(name, root)
    if folder.exists():
        try:
            return verify(name, root)
        except DatasetError as e:
            raise DatasetError(manual_steps(name, root, f"{folder} exists but is not complete: {e}")) from e
    if not src.url:
        raise DatasetError(manual_steps(name, root, "cannot be downloaded by difstudy"))
    if not download:
        raise DatasetError(manual_steps(name, root, f"{folder} does not exist (--no-download)"))
    work = root / ".downloads"
    archive = work / src.archive
    if not archive.exists():  # a finished download is kept until the dataset is in place
        part = archive.with_name(archive.name + ".part")
        try:
            _download(src.url, part, progress, timeout)
        except (urllib.error.URLError, OSError) as e:
            part.unlink(missing_ok=True)
            raise DatasetError(manual_steps(name, root, f"the download failed ({e})")) from e
        part.replace(archive)
    if src.digest:
        algorithm, want = src.digest
        got = file_digest(archive, algorithm)
        if got != want:
            archive.unlink()
            raise DatasetError(
                manual_steps(name, root, f"the download's {algorithm} is {got}, the published one {want}; deleted it")
            )
    staging = work / f"{name}.extract"
    shutil.rmtree(staging, ignore_errors=True)
    _extract(archive, staging)
    found = [p for p in staging.rglob(Path(src.inside).name) if p.is_dir() and p.name == Path(src.inside).name]
    if not found:
        raise DatasetError(manual_steps(name, root, f"the archive {archive} holds no {src.inside}/ folder"))
    folder.parent.mkdir(parents=True, exist_ok=True)
    found[0].replace(folder)
    counts = verify(name, root)
    shutil.rmtree(staging, ignore_errors=True)
    if not any(archive.name == DATASETS[n].archive and not target(n, root).exists() for n in DATASETS if n != name):
        archive.unlink(missing_ok=True)  # kept while another dataset of the same archive is not in place
    return counts


def _prepare_cli(args) -> None:
    names = list(DATASETS) if args.name == "all" else [args.name]
    failed = []
    for name in names:
        try:
            counts = prepare(name, args.root, download=not args.no_download, timeout=args.timeout)
            shown = ", ".join(f"{s} {n}" for s, n in counts.items())
            print(f"{name}: in place at {target(name, args.root)} ({shown})")
        except DatasetError as e:
            if len(names) == 1:
                raise
            failed.append(name)
            print(str(e))
    if failed:
        raise DatasetError(f"not in place: {', '.join(failed)} (the steps for each are above)")


def _list_cli(args) -> None:
    for s in DATASETS.values():
        state = "in place" if args.root and target(s.name, args.root).exists() else ""
        how = "download" if s.url else "manual"
        print(f"{s.name:<11} {s.folder:<30} {how:<8} {state}")


def add_cli(sub) -> None:
    d = sub.add_parser("data", help="real datasets in their official layouts under one data root")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    p = dsub.add_parser("prepare", help="download (where the network allows), verify and place a dataset")
    p.add_argument("name", help=f"{', '.join(DATASETS)} or all")
    p.add_argument("--root", required=True, help="the data root: each dataset gets its own folder in it")
    p.add_argument("--no-download", action="store_true", help="only verify, or print what to place where")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a download fails")
    p.set_defaults(fn=_prepare_cli)
    q = dsub.add_parser("list", help="the datasets, their folders under the root and how they are obtained")
    q.add_argument("--root", default=None)
    q.set_defaults(fn=_list_cli)
