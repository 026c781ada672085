"""`difstudy lab`: JupyterLab after the README's setup, on the notebooks, with live widgets."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from difstudy import lab
from difstudy.errors import DifstudyError
from difstudy.study import ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, token: str):
    req = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_lab_serves_the_notebooks_with_the_widget_manager(tmp_path):
    port, token = _free_port(), "difstudy-test-token"
    cmd = lab.lab_command(port, browser=False, extra=[f"--IdentityProvider.token={token}", "--ServerApp.ip=127.0.0.1"])
    log = (tmp_path / "lab.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):  # the server starts in seconds; slower on a busy machine
            try:
                _get(f"{base}/api/status", token)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"jupyter lab exited: {(tmp_path / 'lab.log').read_text()[-2000:]}")
                time.sleep(1)
        else:
            pytest.fail("jupyter lab did not answer within 2 minutes")
        listing = _get(f"{base}/api/contents/notebooks", token)
        names = {c["name"] for c in listing["content"]}
        assert {"explorer.ipynb", "gate.ipynb", "property_noise.ipynb"} <= names
        nb = _get(f"{base}/api/contents/notebooks/explorer.ipynb", token)["content"]
        assert any("build_widget" in "".join(c["source"]) for c in nb["cells"])
        kernels = _get(f"{base}/api/kernelspecs", token)
        spec = kernels["kernelspecs"][kernels["default"]]["spec"]
        assert Path(spec["argv"][0]).resolve() == Path(sys.executable).resolve()  # the project's own kernel
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    out = subprocess.run(
        [str(Path(sys.executable).parent / "jupyter"), "labextension", "list"], capture_output=True, text=True
    )
    assert lab.WIDGET_EXTENSION in out.stdout + out.stderr  # the explorer's widget is live in Lab


def test_lab_without_jupyterlab_says_how_to_install(monkeypatch):
    monkeypatch.setattr(lab.shutil, "which", lambda *a, **k: None)
    with pytest.raises(DifstudyError, match="bash scripts/bootstrap.sh"):
        lab.lab_command()
