"""Rerun the study's notebooks locally in JupyterLab: ``difstudy lab [--port N] [--no-browser]``.

Starts ``jupyter lab`` (installed by the README's setup, with the ipywidgets manager extension so
the explorer's widget is live) in the project folder, opened on ``notebooks/``, with the
environment's own kernel (``python3`` of ``.venv``, registered by ``scripts/bootstrap.sh``). A
notebook opened there runs on the committed mini model with its ``ci`` defaults; papermill
parameters of the study are the first code cell, tagged ``parameters``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from .errors import DifstudyError
from .study import ROOT

WIDGET_EXTENSION = "@jupyter-widgets/jupyterlab-manager"


def lab_command(port: int | None = None, browser: bool = True, root: Path = ROOT, extra=()) -> list[str]:
    """The ``jupyter lab`` command line :func:`main` runs (raises when JupyterLab is missing)."""
    exe = shutil.which("jupyter-lab", path=str(Path(sys.executable).parent)) or shutil.which("jupyter-lab")
    if exe is None:
        raise DifstudyError(
            "JupyterLab is not installed in this environment; run `bash scripts/bootstrap.sh` "
            "(or `pip install -e '.[book]'`), then `difstudy lab`"
        )
    cmd = [exe, f"--ServerApp.root_dir={root}", "--ServerApp.default_url=/lab/tree/notebooks"]
    if port is not None:
        cmd.append(f"--ServerApp.port={port}")
    if not browser:
        cmd.append("--no-browser")
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers and CI run as root; Jupyter refuses without it
        cmd.append("--allow-root")
    return [*cmd, *extra]


def main(port: int | None = None, browser: bool = True) -> int:
    cmd = lab_command(port, browser)
    print(f"[difstudy lab] {' '.join(cmd)}", flush=True)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.call(cmd, cwd=ROOT, env=env)


def add_cli(sub) -> None:
    p = sub.add_parser("lab", help="open the study's notebooks in JupyterLab (the project's kernel, live widgets)")
    p.add_argument("--port", type=int, default=None, help="the server's port (default: JupyterLab's, 8888 or next)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser (print the URL only)")
    p.set_defaults(fn=lambda a: sys.exit(main(a.port, not a.no_browser)))
