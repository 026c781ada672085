"""The book check fails on warnings in outputs and on scripts from outside the book; the widget
scripts the book ships come verified from the npm registry (difstudy.bookassets)."""

import io
import tarfile

import pytest
from test_bookcheck import GOOD_NB, GOOD_OTHER, kinds, site

from difstudy import bookassets
from difstudy.bookcheck import check_static
from difstudy.errors import DifstudyError

STDERR = (
    '<div class="cell_output docutils container"><div class="output stderr highlight-myst-ansi notranslate">'
    "<pre>/x/peft/tuners_utils.py:331: UserWarning: Already found a peft_config</pre></div></div>"
)


def test_a_warning_or_stderr_stream_in_an_output_is_caught(tmp_path):
    problems = check_static(*site(tmp_path, nb=GOOD_NB.replace("</body>", STDERR + "</body>")))
    assert kinds(problems) == [("book/_generated/nb", "warning output")]
    assert "UserWarning: Already found" in str(problems[0])
    # a warning printed to stdout (no stderr class) is caught by its text
    stdout = STDERR.replace("output stderr", "output stream")
    assert kinds(check_static(*site(tmp_path / "b", nb=GOOD_NB.replace("</body>", stdout + "</body>")))) == [
        ("book/_generated/nb", "warning output")
    ]
    # the word in prose is not an output
    prose = GOOD_OTHER.replace("<p>text</p>", "<p>peft printed a UserWarning: here, now fixed</p>")
    assert check_static(*site(tmp_path / "c", other=prose)) == []


def test_a_script_from_outside_the_book_is_caught(tmp_path):
    cdn = '<script src="https://cdn.jsdelivr.net/npm/@jupyter-widgets/html-manager@1.0.6/dist/embed-amd.js"></script>'
    local = '<script src="../_static/vendor/embed-amd.js"></script>'
    html, toc, generated = site(tmp_path, other=GOOD_OTHER.replace("</body>", cdn + local + "</body>"))
    (html / "_static" / "vendor").mkdir()
    (html / "_static" / "vendor" / "embed-amd.js").write_text("")
    problems = check_static(html, toc, generated)
    assert kinds(problems) == [("book/other", "external script")] and "cdn.jsdelivr.net" in str(problems[0])


def _tarball(member, data):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_widget_scripts_are_fetched_once_verified_and_refused_when_altered(tmp_path, monkeypatch):
    blobs = {url: _tarball(member, f"// {name}".encode()) for name, (url, member, _) in bookassets.WIDGET_JS.items()}
    pinned = {n: (u, m, bookassets.integrity(blobs[u])) for n, (u, m, _) in bookassets.WIDGET_JS.items()}
    monkeypatch.setattr(bookassets, "WIDGET_JS", pinned)
    calls = []

    def fetch(url):
        calls.append(url)
        return blobs[url]

    paths = bookassets.ensure_widget_js(tmp_path, fetch=fetch, log=lambda m: None)
    assert [p.read_text() for p in paths] == ["// require.js", "// embed-amd.js"] and len(calls) == 2
    bookassets.ensure_widget_js(tmp_path, fetch=fetch, log=lambda m: None)
    assert len(calls) == 2  # there already: nothing downloaded
    for p in paths:
        p.unlink()
    with pytest.raises(DifstudyError, match="does not match its pinned integrity"):
        bookassets.ensure_widget_js(tmp_path, fetch=lambda url: blobs[url] + b"x", log=lambda m: None)
    assert not any(p.exists() for p in paths)  # nothing unverified is written

    def offline(url):
        raise OSError("network unreachable")

    with pytest.raises(DifstudyError, match="allow registry.npmjs.org, or place package/require.js"):
        bookassets.ensure_widget_js(tmp_path, fetch=offline, log=lambda m: None)


def test_a_negative_zero_in_an_output_is_caught(tmp_path):
    cell = '<div class="cell_output docutils container"><table><tr><td>{}</td><td>holds</td></tr></table></div>'
    bad = GOOD_NB.replace("</body>", cell.format("-0.000 [-0.001, 0.0004]") + "</body>")
    problems = check_static(*site(tmp_path, nb=bad))
    assert kinds(problems) == [("book/_generated/nb", "negative zero")] and "difstudy.display" in str(problems[0])
    # the same effect with the digits its interval needs passes, and so do -0.0003 and 10.0
    good = GOOD_NB.replace("</body>", cell.format("-0.00031 [-0.00100, 0.00040] 10.0 x-0.0") + "</body>")
    assert check_static(*site(tmp_path / "b", nb=good)) == []
