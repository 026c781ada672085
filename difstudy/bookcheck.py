"""Check the built book as a reader would see it: ``difstudy check-book [--html _build/html]``.

**Static checks**, on every page of the table of contents (``book/_toc.yml``):

- the page exists in the HTML build;
- its figures are there: every ``<img>`` points at a file that exists, and a
  page built from an executed notebook (``book/_generated/<name>.ipynb``) shows
  at least as many images and tables as the notebook's visible outputs hold;
- it shows no error: no Python traceback and no papermill error message in
  any cell output (the :data:`ERROR_TEXTS`), no error output (myst-nb's
  ``traceback`` class), no papermill error marker;
- it shows no warning: no stderr stream (myst-nb's ``stderr`` class) and no
  ``UserWarning:``-style line in any cell output (fix the cause: a page prints none);
- it loads no script from outside the book (the widget scripts ship with it:
  :mod:`difstudy.bookassets`), so it reads the same offline;
- its internal links work: every local ``href``/``src`` names a file that
  exists, and a ``#anchor`` on an HTML page names an ``id`` on that page.

**Browser check**: each toc page is opened in headless Chromium (Debian's
``chromium``; this module installs nothing, the error says how), a screenshot
saved as ``_build/screenshots/<page>.png``, and a page whose screenshot is
nearly one colour (:data:`BLANK_FRACTION` of its pixels) fails as blank.

Every problem is listed (page, kind, detail); the command exits non-zero if
there is any.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .errors import DifstudyError
from .study import GENERATED, ROOT, TOC, toc_files

BLANK_FRACTION = 0.995  # a screenshot with this share of one colour is blank
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = "install it with `apt-get install -y chromium` (Debian/Ubuntu), or pass --no-browser"
ERROR_TEXTS = ("Traceback (most recent call last)", "An Exception was encountered at")  # searched in outputs
VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
ERROR_CLASSES = ("traceback", "output error")
ERROR_IDS = ("papermill-error-cell",)
WARNING_TEXT = re.compile(r"\b[A-Z]\w*Warning: ")  # e.g. "UserWarning: ", as Python prints a warning
# a number printed as a negative zero ("-0.000"): an effect shown with fewer digits than it needs
NEGATIVE_ZERO = re.compile(r"(?<![\w.])[-\u2212]0\.0+(?![\d])")


@dataclass(frozen=True)
class Problem:
    page: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.page}: {self.kind}: {self.detail}"


class _Page(HTMLParser):
    """What the checks need from one HTML page."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.images: list[str] = []
        self.tables = 0
        self.classes: list[str] = []
        self.text: list[str] = []  # text inside cell outputs (div.cell_output), where errors show
        self.stderr: list[str] = []  # text of stderr streams (class "stderr") in cell outputs
        self.scripts: list[str] = []  # every <script src>
        self._stack: list[tuple[bool, bool]] = []  # per open element: inside a cell output? inside stderr?

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag not in VOID_TAGS:
            outer, err = self._stack[-1] if self._stack else (False, False)
            classes = (a.get("class") or "").split()
            inside = outer or "cell_output" in classes
            self._stack.append((inside, err or (inside and "stderr" in classes)))
        for key in ("id", "name") if tag == "a" else ("id",):
            if a.get(key):
                self.ids.add(a[key])
        if a.get("class"):
            self.classes.append(a["class"])
        if tag in ("a", "link") and a.get("href"):
            self.links.append(a["href"])
        if tag in ("script", "source") and a.get("src"):  # <img> is checked as a figure
            self.links.append(a["src"])
        if tag == "script" and a.get("src"):
            self.scripts.append(a["src"])
        if tag == "img":
            self.images.append(a.get("src") or "")
        if tag == "table":
            self.tables += 1

    def handle_endtag(self, tag):
        if tag not in VOID_TAGS and self._stack:
            self._stack.pop()

    def handle_data(self, data):
        if self._stack and self._stack[-1][0]:
            self.text.append(data)
            if self._stack[-1][1]:
                self.stderr.append(data)


def parse(path: Path) -> _Page:
    p = _Page()
    p.feed(path.read_text(errors="replace"))
    return p


def expected_outputs(notebook: Path) -> tuple[int, int]:
    """(images, tables) among an executed notebook's outputs that the page shows (removed cells excluded)."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    images = tables = 0
    for c in nb.cells:
        tags = set(c.metadata.get("tags", []))
        if c.cell_type != "code" or tags & {"remove-output", "remove-cell"}:
            continue
        for o in c.get("outputs", []):
            data = o.get("data", {})
            if any(k in data for k in ("image/png", "image/jpeg", "image/svg+xml")):
                images += 1
            elif "<table" in str(data.get("text/html", "")):
                tables += 1
    return images, tables


def _is_external(url: str) -> bool:
    return bool(urlsplit(url).scheme) or url.startswith("//")


def check_static(html_dir: str | Path, toc: str | Path, generated: str | Path | None = None) -> list[Problem]:
    """Every toc page: exists, its figures/tables, no error output, internal links resolve."""
    html_dir, toc = Path(html_dir), Path(toc)
    if not html_dir.is_dir():
        raise DifstudyError(f"no built book at {html_dir}; build it with `difstudy run` (or scripts/study.sh)")
    generated = Path(generated) if generated is not None else None
    problems: list[Problem] = []
    parsed: dict[Path, _Page] = {}

    def page_of(path: Path) -> _Page:
        if path not in parsed:
            parsed[path] = parse(path)
        return parsed[path]

    prefix = GENERATED.as_posix() + "/"
    for entry in toc_files(toc):
        html = html_dir / f"{entry}.html"
        if not html.exists():
            problems.append(Problem(entry, "missing page", f"{html} does not exist"))
            continue
        page = page_of(html)
        text = " ".join(" ".join(page.text).split())
        for needle in ERROR_TEXTS:
            if needle in text:
                i = text.index(needle)
                problems.append(Problem(entry, "error output", f"...{text[max(0, i - 80) : i + 120]}..."))
        for cls in page.classes:
            words = f" {cls} "
            if any(f" {c} " in words for c in ERROR_CLASSES):
                problems.append(Problem(entry, "error output", f'an element of class "{cls}"'))
        for i in ERROR_IDS:
            if i in page.ids:
                problems.append(Problem(entry, "error output", f"papermill's error marker #{i}"))
        warned = WARNING_TEXT.search(text)
        stderr = " ".join(" ".join(page.stderr).split())
        if stderr or warned:
            shown = stderr or text[max(0, warned.start() - 80) : warned.start() + 160]
            problems.append(Problem(entry, "warning output", f"a warning or stderr stream in an output: {shown[:240]}"))
        zero = NEGATIVE_ZERO.search(text)
        if zero:
            shown = text[max(0, zero.start() - 80) : zero.end() + 80]
            problems.append(
                Problem(
                    entry, "negative zero", f"...{shown}...: show it with difstudy.display (digits of its interval)"
                )
            )
        for src in page.scripts:
            if _is_external(src):
                problems.append(Problem(entry, "external script", f"<script src={src!r}>: ship it with the book"))
        for src in page.images:
            if not src or (not _is_external(src) and not src.startswith("data:") and not _target(html, src).exists()):
                problems.append(Problem(entry, "missing figure", f"<img src={src!r}> has no file"))
        if generated is not None and entry.startswith(prefix):
            nb = generated / f"{entry[len(prefix) :]}.ipynb"
            if nb.exists():
                want_img, want_tab = expected_outputs(nb)
                if len(page.images) < want_img:
                    problems.append(
                        Problem(entry, "missing figure", f"{len(page.images)} images shown, {nb} has {want_img}")
                    )
                if page.tables < want_tab:
                    problems.append(Problem(entry, "missing table", f"{page.tables} tables shown, {nb} has {want_tab}"))
        for link in page.links:
            problem = check_link(html, link, page_of)
            if problem:
                problems.append(Problem(entry, "broken link", problem))
    return problems


def _target(page: Path, url: str) -> Path:
    path = unquote(urlsplit(url).path)
    return (page.parent / path).resolve() if path else page


def check_link(page: Path, url: str, page_of=parse) -> str | None:
    """None if a local link from ``page`` resolves (file, and ``#anchor`` on HTML targets), else why not."""
    if _is_external(url) or url.startswith("data:") or url in ("#", ""):
        return None
    target = _target(page, url)
    if not target.exists():
        return f"{url!r} -> {target} does not exist"
    if target.is_dir():
        target = target / "index.html"
        if not target.exists():
            return f"{url!r} -> a folder without index.html"
    anchor = unquote(urlsplit(url).fragment)
    if anchor and target.suffix == ".html" and anchor not in page_of(target).ids:
        return f"{url!r}: no id {anchor!r} in {target.name}"
    return None


# -- browser --------------------------------------------------------------------------
def find_chromium() -> str:
    for name in CHROMIUM_NAMES:
        exe = shutil.which(name)
        if exe:
            return exe
    raise DifstudyError(f"headless Chromium not found (looked for {', '.join(CHROMIUM_NAMES)}); {INSTALL_HINT}")


def screenshot(url: str, png: Path, chromium: str, size: tuple[int, int] = (1280, 1600), timeout: int = 120) -> Path:
    """Headless Chromium's screenshot of ``url`` into ``png``."""
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="difstudy-chromium-") as profile:
        cmd = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            f"--window-size={size[0]},{size[1]}",
            url,
        ]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DifstudyError(f"chromium took more than {timeout} s on {url}") from None
    if not png.exists():
        raise DifstudyError(f"chromium wrote no screenshot of {url} (exit {r.returncode}):\n{r.stderr[-1500:]}")
    return png


def dominant_fraction(png: Path) -> float:
    """Share of the pixels that have the image's most common colour (1.0: one flat colour)."""
    from PIL import Image

    with Image.open(png) as im:
        rgb = im.convert("RGB")
        colors = rgb.getcolors(maxcolors=rgb.width * rgb.height)
        return max(n for n, _ in colors) / (rgb.width * rgb.height)


def check_browser(html_dir: str | Path, toc: str | Path, shots: str | Path) -> tuple[list[Problem], list[Path]]:
    """Screenshot every toc page that exists; blank pages are problems."""
    chromium = find_chromium()
    html_dir, shots = Path(html_dir), Path(shots)
    problems, files = [], []
    for entry in toc_files(toc):
        html = html_dir / f"{entry}.html"
        if not html.exists():
            continue  # reported by the static check
        png = shots / (re.sub(r"[^A-Za-z0-9_.-]", "_", entry) + ".png")
        try:
            screenshot(html.resolve().as_uri(), png, chromium)
        except DifstudyError as e:
            problems.append(Problem(entry, "browser", str(e)))
            continue
        files.append(png)
        frac = dominant_fraction(png)
        if frac >= BLANK_FRACTION:
            problems.append(Problem(entry, "blank page", f"{png}: {frac:.1%} of the pixels are one colour"))
    return problems, files


def check_book(
    html_dir: str | Path | None = None,
    toc: str | Path | None = None,
    generated: str | Path | None = None,
    shots: str | Path | None = None,
    browser: bool = True,
    root: Path = ROOT,
) -> list[Problem]:
    """The static checks, then (``browser``) the screenshots; returns every problem found.

    Defaults: ``_build/html``, ``book/_toc.yml``, ``book/_generated`` and
    ``_build/screenshots`` under ``root``."""
    html_dir = Path(html_dir or root / "_build" / "html")
    toc = Path(toc or root / TOC)
    generated = Path(generated or root / GENERATED)
    problems = check_static(html_dir, toc, generated)
    print(f"[check-book] static checks on {len(toc_files(toc))} toc pages in {html_dir}: {len(problems)} problems")
    if browser:
        shots = Path(shots or html_dir.parent / "screenshots")
        found, files = check_browser(html_dir, toc, shots)
        problems += found
        print(f"[check-book] {len(files)} screenshots in {shots}: {len(found)} problems")
    return problems


def _cli(a) -> None:
    problems = check_book(a.html, a.toc, None, a.screenshots, browser=not a.no_browser)
    if problems:
        raise DifstudyError(f"{len(problems)} problems in the book:\n" + "\n".join(f"  {p}" for p in problems))
    print("[check-book] ok")


def add_cli(sub) -> None:
    c = sub.add_parser("check-book", help="check the built book: pages, figures, errors, links, browser screenshots")
    c.add_argument("--html", default=None, help="built book (default: _build/html)")
    c.add_argument("--toc", default=None, help="table of contents (default: book/_toc.yml)")
    c.add_argument("--screenshots", default=None, help="screenshot folder (default: _build/screenshots)")
    c.add_argument("--no-browser", action="store_true", help="static checks only (no Chromium)")
    c.set_defaults(fn=_cli)
