"""`difstudy data prepare`: download from a (local) server, checksum, safe extraction, layout check,
and the manual steps when it cannot (issue 23). The server is a local http.server: no network."""

from __future__ import annotations

import functools
import hashlib
import http.server
import tarfile
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from difstudy.cli import main
from difstudy.data import prepare as DP
from difstudy.data.export import to_spair
from difstudy.data.toyworld import ToyWorld
from difstudy.errors import DatasetError


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A toy world exported in SPair-71k's layout, packed as SPair-71k.tar.gz, served on localhost."""
    base = tmp_path_factory.mktemp("server")
    to_spair(ToyWorld("test", n=40, size=32), base / "build" / "SPair-71k", n_pairs=4, progress=False)
    with tarfile.open(base / "SPair-71k.tar.gz", "w:gz") as t:
        t.add(base / "build" / "SPair-71k", arcname="SPair-71k")
    evil = base / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as t:
        t.add(base / "SPair-71k.tar.gz", arcname="../outside.tar.gz")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(base))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield base, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _toy_spair(url, digest=None, archive="SPair-71k.tar.gz"):
    # the toy export has one split's annotations; the real dataset's splits are trn, val and test
    return replace(DP.DATASETS["spair"], url=f"{url}/{archive}", archive=archive, digest=digest, splits=("test",))


def test_prepare_downloads_checks_extracts_and_verifies(served, tmp_path, monkeypatch):
    base, url = served
    sha = hashlib.sha256((base / "SPair-71k.tar.gz").read_bytes()).hexdigest()
    monkeypatch.setitem(DP.DATASETS, "spair", _toy_spair(url, ("sha256", sha)))
    counts = DP.prepare("spair", tmp_path, progress=False)
    assert counts == {"test": 4}
    assert (tmp_path / "SPair-71k" / "PairAnnotation" / "test").is_dir()
    assert not (tmp_path / ".downloads" / "SPair-71k.tar.gz").exists()  # archive and staging cleaned up
    assert not (tmp_path / ".downloads" / "spair.extract").exists()
    # rerun: already in place, nothing downloaded (the server is not asked)
    monkeypatch.setitem(DP.DATASETS, "spair", _toy_spair("http://127.0.0.1:9", ("sha256", sha)))
    assert DP.prepare("spair", tmp_path, progress=False) == {"test": 4}


def test_a_checksum_mismatch_deletes_the_download_and_names_both_digests(served, tmp_path, monkeypatch):
    _, url = served
    monkeypatch.setitem(DP.DATASETS, "spair", _toy_spair(url, ("sha256", "0" * 64)))
    with pytest.raises(DatasetError, match=r"sha256 is [0-9a-f]{64}, the published one 0{64}; deleted it"):
        DP.prepare("spair", tmp_path, progress=False)
    assert not any((tmp_path / ".downloads").iterdir()) and not (tmp_path / "SPair-71k").exists()


def test_no_network_or_no_url_gives_the_manual_steps(tmp_path, monkeypatch):
    monkeypatch.setitem(DP.DATASETS, "spair", _toy_spair("http://127.0.0.1:9"))  # nothing listens on port 9
    with pytest.raises(DatasetError) as e:
        DP.prepare("spair", tmp_path, progress=False, timeout=5)
    text = str(e.value)
    assert "the download failed" in text and "cvlab.postech.ac.kr/research/SPair-71k" in text
    assert f"extract it so that {tmp_path / 'SPair-71k'}" in text and "PairAnnotation" in text
    assert f"difstudy data prepare spair --root {tmp_path}" in text
    with pytest.raises(DatasetError, match="needs a login"):
        DP.prepare("cityscapes", tmp_path)
    with pytest.raises(DatasetError, match="--no-download"):
        DP.prepare("cifar10", tmp_path, download=False)
    (tmp_path / "cifar-10-batches-py").mkdir()  # a folder that is there but incomplete
    with pytest.raises(DatasetError, match="exists but is not complete"):
        DP.prepare("cifar10", tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'"):
        DP.prepare("imagenet", tmp_path)


def test_an_archive_member_outside_the_target_is_refused(served, tmp_path, monkeypatch):
    _, url = served
    monkeypatch.setitem(DP.DATASETS, "spair", _toy_spair(url, archive="evil.tar.gz"))
    with pytest.raises(DatasetError, match="a member would land outside"):
        DP.prepare("spair", tmp_path, progress=False)
    assert not (tmp_path / "outside.tar.gz").exists() and not (tmp_path / ".downloads" / "outside.tar.gz").exists()


def test_cli_prepare_and_list(served, tmp_path, monkeypatch, capsys):
    _, url = served
    monkeypatch.setitem(DP.DATASETS, "spair", _toy_spair(url))
    main(["data", "prepare", "spair", "--root", str(tmp_path)])
    assert f"spair: in place at {tmp_path / 'SPair-71k'} (test 4)" in capsys.readouterr().out
    main(["data", "list", "--root", str(tmp_path)])
    out = capsys.readouterr().out
    assert "cifar10" in out and "cityscapes" in out and "in place" in out.splitlines()[0]
    with pytest.raises(SystemExit) as e:
        main(["data", "prepare", "cityscapes", "--root", str(tmp_path)])
    assert e.value.code != 0 and "needs a login" in capsys.readouterr().err


def test_every_dataset_names_its_page_folder_and_layout():
    for s in DP.DATASETS.values():
        assert s.page and s.folder and s.layout and s.splits, s.name
        assert (s.url is None) == (s.archive is None), s.name
        assert s.url is None or s.url.startswith(("https://", "http://")), s.name
        assert Path(s.folder).parts[-1], s.name


def test_the_toy_world_under_one_data_root_passes_every_layout_check(tmp_path):
    """The rehearsal's data root: the toy world in the folders and layouts of the real datasets,
    which `difstudy data prepare` then verifies as it would the real ones (no download)."""
    from difstudy.data.export import to_data_root
    from difstudy.data.loaders import ADE20K, CIFAR10
    from difstudy.data.toyworld import CLASS_NAMES

    to_data_root(tmp_path, n=12, size=64, n_pairs=4, progress=False)
    counts = {name: DP.prepare(name, tmp_path, download=False) for name in ("spair", "horse21", "ade20k", "cifar10")}
    assert set(counts["spair"]) == {"trn", "val", "test"} and 1 <= min(counts["spair"].values()) <= 4
    assert counts["ade20k"] == {"training": 12, "validation": 24} and counts["cifar10"] == {"train": 12, "test": 12}
    assert min(counts["horse21"].values()) >= 1
    item = ADE20K(tmp_path, "training")[0]
    assert item["mask"].min() >= 0 and item["mask"].max() <= 10  # 0 background, 1 + class inside the object
    cifar = CIFAR10(tmp_path, "train")
    assert cifar[0]["image"].shape == (32, 32, 3) and cifar.class_names == CLASS_NAMES
    assert sorted({cifar[i]["label"] for i in range(len(cifar))}) == sorted(set(cifar.labels.tolist()))
