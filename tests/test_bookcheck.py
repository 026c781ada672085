"""The book check's static part on a tiny fake built site; the blank-page measure on made-up PNGs."""

import nbformat
import numpy as np
import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output
from PIL import Image

from difstudy.bookcheck import check_static, dominant_fraction, find_chromium
from difstudy.errors import DifstudyError

TOC = """format: jb-book
root: book/intro
parts:
  - caption: Pages
    chapters:
      - file: book/_generated/nb
      - file: book/other
"""

GOOD_INTRO = """<html><body><main id="main-content">
<h1 id="welcome">Welcome</h1>
<a href="other.html#results">results</a> <a href="_generated/nb.html">notebook</a>
<a href="#welcome">top</a> <a href="https://example.org/x.html#nowhere">external</a>
<link rel="stylesheet" href="../_static/style.css">
</main></body></html>"""

GOOD_NB = """<html><body><h1 id="nb">Notebook</h1>
<div class="cell_output docutils container"><img src="../../_images/fig.png" alt="a figure">
<table><tr><td>1</td></tr></table></div>
<a href="../intro.html">back</a></body></html>"""

GOOD_OTHER = """<html><body><h1 id="other">Other</h1><section id="results"><p>text</p></section></body></html>"""


def site(tmp_path, intro=GOOD_INTRO, nb=GOOD_NB, other=GOOD_OTHER):
    html = tmp_path / "_build" / "html"
    (html / "book" / "_generated").mkdir(parents=True)
    (html / "_images").mkdir()
    (html / "_static").mkdir()
    (html / "_images" / "fig.png").write_bytes(b"png")
    (html / "_static" / "style.css").write_text("")
    (html / "book" / "intro.html").write_text(intro)
    (html / "book" / "_generated" / "nb.html").write_text(nb)
    if other is not None:
        (html / "book" / "other.html").write_text(other)
    toc = tmp_path / "_toc.yml"
    toc.write_text(TOC)
    generated = tmp_path / "generated"
    generated.mkdir()
    cell = new_code_cell("plot()")
    cell.outputs = [
        new_output("display_data", data={"image/png": "iVBOR", "text/plain": "<Figure>"}),
        new_output("execute_result", data={"text/html": "<table></table>", "text/plain": "df"}, execution_count=1),
    ]
    nbformat.write(new_notebook(cells=[cell]), generated / "nb.ipynb")
    return html, toc, generated


def kinds(problems):
    return sorted((p.page, p.kind) for p in problems)


def test_a_good_site_passes(tmp_path):
    assert check_static(*site(tmp_path)) == []


def test_broken_links_and_anchors_are_caught(tmp_path):
    intro = GOOD_INTRO.replace("other.html#results", "other.html#no-such-section").replace(
        "_generated/nb.html", "_generated/gone.html"
    )
    problems = check_static(*site(tmp_path, intro=intro))
    assert kinds(problems) == [("book/intro", "broken link"), ("book/intro", "broken link")]
    text = " ".join(str(p) for p in problems)
    assert "no id 'no-such-section' in other.html" in text and "gone.html" in text


def test_a_traceback_or_papermill_error_is_caught(tmp_path):
    tb = GOOD_NB.replace(
        "</body>",
        '<div class="cell_output docutils container"><div class="output traceback highlight-ipythontb"><pre>'
        '<span class="ansi-red-fg">ZeroDivisionError</span>   Traceback (most recent call last)<br>'
        "----&gt; 1 1/0</pre></div></div></body>",
    )
    problems = check_static(*site(tmp_path, nb=tb))
    assert kinds(problems) == [("book/_generated/nb", "error output")] * 2
    # the same words in prose (say, documentation about tracebacks) are not an error
    prose = GOOD_OTHER.replace("<p>text</p>", "<p>no Traceback (most recent call last) here</p>")
    assert check_static(*site(tmp_path / "c", other=prose)) == []
    pm = GOOD_OTHER.replace("<p>text</p>", '<span id="papermill-error-cell">Execution ... stopped:</span>')
    assert kinds(check_static(*site(tmp_path / "b", other=pm))) == [("book/other", "error output")]


def test_missing_pages_figures_and_tables_are_caught(tmp_path):
    gone = GOOD_NB.replace('<img src="../../_images/fig.png" alt="a figure">', "")
    assert kinds(check_static(*site(tmp_path / "a", nb=gone))) == [("book/_generated/nb", "missing figure")]
    nb = GOOD_NB.replace("fig.png", "lost.png").replace("<table><tr><td>1</td></tr></table>", "")
    problems = check_static(*site(tmp_path, nb=nb, other=None))
    assert kinds(problems) == [
        ("book/_generated/nb", "missing figure"),  # its file is gone
        ("book/_generated/nb", "missing table"),  # 0 tables shown, the notebook has 1
        ("book/intro", "broken link"),  # to the missing page
        ("book/other", "missing page"),
    ]


def test_no_build_names_the_command(tmp_path):
    with pytest.raises(DifstudyError, match="difstudy run"):
        check_static(tmp_path / "nothing", tmp_path / "_toc.yml")


def test_blank_screenshots_are_nearly_one_colour(tmp_path):
    blank = np.full((200, 300, 3), 255, np.uint8)
    blank[:1, :100] = 0  # a stray line is still blank
    page = blank.copy()
    page[20:180:8, 20:250] = 30  # lines of "text"
    Image.fromarray(blank).save(tmp_path / "blank.png")
    Image.fromarray(page).save(tmp_path / "page.png")
    assert dominant_fraction(tmp_path / "blank.png") > 0.995
    assert dominant_fraction(tmp_path / "page.png") == pytest.approx(1 - (100 + 20 * 230) / (200 * 300))


def test_missing_chromium_says_how_to_install(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(DifstudyError, match="apt-get install -y chromium"):
        find_chromium()
