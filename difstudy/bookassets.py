"""The scripts the static book needs, shipped with it instead of loaded from a CDN.

A page that shows a saved ipywidgets view (the explorer's widget, a progress bar's state) needs
RequireJS and the widget manager's embed bundle. myst-nb loads both from public CDNs by default,
so an offline reader sees an empty widget. :func:`ensure_widget_js` takes them from the npm
registry instead (the package tarballs, verified against the registry's sha512 integrity pinned
here), once, into ``book/_static/vendor/`` (not committed; the book build copies ``_static``), and
``_config.yml`` (``nb_ipywidgets_js``) points the pages at those copies. ``difstudy check-book``
fails on any page that loads a script from outside the book.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import tarfile
import urllib.request
from pathlib import Path

from .errors import DifstudyError
from .fileio import atomic_write

VENDOR = Path("book") / "_static" / "vendor"
# file in book/_static/vendor -> (npm tarball, member, the registry's sha512 integrity of the tarball)
WIDGET_JS = {
    "require.js": (
        "https://registry.npmjs.org/requirejs/-/requirejs-2.3.4.tgz",
        "package/require.js",
        "sha512-qPD5gRrj6kGQ0ZySAJgqbArkaDqPMbQIT0zSZDkIv1mfA17w/tR2Faq5l2qqRf2CdQx6FWln9nUrgd2UDzb19A==",
    ),
    "embed-amd.js": (
        "https://registry.npmjs.org/@jupyter-widgets/html-manager/-/html-manager-1.0.6.tgz",
        "package/dist/embed-amd.js",
        "sha512-+Mn+Ra8wyIHrYaUpfmf9A3dsLkt/NuwzPQN8sthdxBD35VV5cOJbpmgMhNR27n/rmP3mKyEe0PWCJrtZrXTXDQ==",
    ),
}


def integrity(data: bytes) -> str:
    """The npm registry's ``dist.integrity`` of ``data`` (``sha512-`` + base64 digest)."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def extract_member(tarball: bytes, member: str, expected: str, url: str = "the tarball") -> bytes:
    """``member`` of a verified npm tarball; a tarball whose integrity differs is refused."""
    got = integrity(tarball)
    if got != expected:
        raise DifstudyError(f"{url} does not match its pinned integrity ({got[:24]}... != {expected[:24]}...)")
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        try:
            return tar.extractfile(member).read()
        except (KeyError, AttributeError):
            raise DifstudyError(f"{url} holds no {member}") from None


def ensure_widget_js(root: str | os.PathLike, fetch=None, log=print) -> list[Path]:
    """The widget scripts in ``root/book/_static/vendor`` (downloaded once); returns their paths.

    ``fetch(url) -> bytes`` defaults to an HTTPS GET with a 60 s timeout."""
    fetch = fetch or _get
    out = []
    for name, (url, member, expected) in WIDGET_JS.items():
        path = Path(root) / VENDOR / name
        if not path.exists():
            log(f"[difstudy] fetching {name} for the book's widgets from {url}")
            try:
                data = fetch(url)
            except OSError as e:
                raise DifstudyError(
                    f"could not download {url} ({e}); the book's widget scripts come from the npm registry: "
                    f"allow registry.npmjs.org, or place {member} of that tarball at {path}"
                ) from None
            content = extract_member(data, member, expected, url)
            atomic_write(path, lambda f, c=content: f.write(c))
        out.append(path)
    return out


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as r:  # noqa: S310 (a fixed https URL)
        return r.read()
