"""report.html: self-contained, escaped, complete; `zoom report` rebuilds every report file from the
records alone; bad run directories give one line and exit 2; and the page in a real headless
Chromium, offline: it renders, every image loads, no console error, hostile attribute names stay text.

The browser test needs Debian's `chromium` (/usr/bin/chromium; .ci/run installs it) and the `playwright`
package (never `playwright install`): without them it fails rather than skips. Its screenshots are
saved under pytest's tmp dir and, with ZOOM_ARTIFACTS set, copied to artifacts/.
"""

import base64
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from planted import PLANTED
from synthetic import pattern, write_run
from zoom.cli import main
from zoom.report import write_report

XSS = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>']
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


class Page(HTMLParser):
    """Every tag with its attributes, and the text of <style> blocks."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.tags, self.styles, self._in_style = [], [], False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    """A sweep run whose attribute names are HTML injections, with 20 seeds (more than the gallery shows)."""
    n = 20
    flips = {XSS[0]: pattern(15, n), XSS[1]: pattern(6, n), "rain & fog 100% $x$": pattern(3, n),
             "null": pattern(3, n)}
    run = write_run(tmp_path_factory.mktemp("hostile") / "run", flips, mode="sweep")
    write_report(run)
    return run


def _assert_self_contained(run_dir: Path):
    text = (run_dir / "report.html").read_text(encoding="utf-8")
    page = Page(text)
    tags = [t for t, _ in page.tags]
    for forbidden in ("script", "link", "iframe", "object", "embed", "base", "form"):
        assert forbidden not in tags, forbidden
    images = [a for t, a in page.tags if t == "img"]
    assert images
    for tag, attrs in page.tags:
        for key, value in attrs.items():
            assert not key.startswith("on"), (tag, key)
            if key in ("src", "href", "action", "poster", "srcset") and value:
                assert not re.match(r"(?i)^\s*([a-z][a-z0-9+.-]*:|//)", value) or value.startswith("data:image/svg+xml;base64,"), value
    for attrs in images:
        src = attrs["src"]
        if src.startswith("data:"):
            svg = base64.b64decode(src.split(",", 1)[1]).decode("utf-8")
            assert "<svg" in svg and "<script" not in svg.lower() and "<foreignobject" not in svg.lower()
        else:
            assert (run_dir / src).is_file(), src
            assert attrs.get("loading") == "lazy"
    css = "".join(page.styles)
    assert "url(" not in css and "@import" not in css
    assert not re.search(r"(?i)https?://|ftp://", text), "no external URL anywhere in the page"
    return text, page


def test_report_html_is_self_contained_escaped_and_complete(hostile_run):
    text, page = _assert_self_contained(hostile_run)
    report = json.loads((hostile_run / "report.json").read_text())
    # hostile names only ever appear escaped
    for name in XSS:
        assert name not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in text
    assert "rain &amp; fog 100% $x$" in text
    # ranked summary: the forest plot and one table row per attribute plus the null
    assert "Forest plot" in text and "null control" in text and "q (BH)" in text
    assert report["attributes"][0]["name"] == XSS[0] and report["attributes"][0]["significant"]
    # dose-response (sweep), strength histograms, per-class table, run facts
    assert 'id="dose"' in text and "dose_response" in report["attributes"][0]
    assert 'id="strength"' in text and 'id="per-class"' in text
    for label in ("smiling", "neutral", "frowning"):
        assert label in text
    assert "abababababababab" in text and "EulerDiscreteScheduler" in text and "123456789" not in text
    assert "117.7 MiB" in text  # peak memory, human readable
    # gallery: at most 12 pairs per attribute, flipped first, and a count of the rest
    sections = text.split('id="g-')[1:]
    assert len(sections) == 4  # three attributes and the null
    first = sections[0]
    assert first.count('class="pair') == 12
    assert first.index("pair flipped") < first.index("not flipped") if "not flipped" in first else True
    assert "and 8 more not shown (3 of them flipped)" in first
    assert sections[-1].count('class="pair') == 12


def test_report_marks_random_model_and_incomplete_runs(tmp_path):
    run = write_run(tmp_path / "demo", {"hat": pattern(2, 8), "null": pattern(1, 8)}, random_models=True)
    path = run / "records" / "rank-0.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-2]))
    report = write_report(run)
    text = (run / "report.html").read_text()
    assert "Random models." in text and "meaningless" in text
    assert "Incomplete run." in text and "14 of 16" in text
    assert report["completeness"] == {"finished": 14, "expected": 16, "complete": False}


def test_report_says_what_the_command_line_replaced_and_shows_confirmed_flips(tmp_path):
    """A config's description is about its own target and prompts: a run that replaced them says so. The
    table shows raw and confirmed flips side by side; hat's flips are not visible to the judge."""
    import yaml

    n = 48
    run = write_run(tmp_path / "run", {"hat": pattern(36, n), "scarf": pattern(30, n), "null": pattern(3, n)},
                    visible={"scarf"})
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["description"] = "A <b>face</b> classifier audited for hats."
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    meta = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**meta, "overridden": ["target.spec", "prompts"]}))
    report = write_report(run)
    text = (run / "report.html").read_text()
    assert "A &lt;b&gt;face&lt;/b&gt; classifier" in text
    assert "This run replaced the target and the prompt set on the command line" in text
    rows = {a["name"]: a for a in report["attributes"]}
    assert rows["hat"]["flips"] == 36 and rows["hat"]["raw_significant"] and not rows["hat"]["significant"]
    assert rows["scarf"]["confirmed_flips"] == 30 and rows["scarf"]["significant"]
    assert report["attributes"][0]["name"] == "scarf"  # ranked by confirmed flips, not raw ones
    assert "confirmed / n" in text and "36/48" in text and "30/48" in text
    assert rows["hat"]["confirmation_p_value"] > 0.05 > rows["scarf"]["confirmation_p_value"]


def test_zoom_report_rebuilds_the_audits_report(planted_run):
    run, _ = planted_run
    written = {name: (run / name).read_text() for name in ("report.json", "report.csv", "report.html")}
    result = invoke("report", run)
    assert result.exit_code == 0, result.output
    assert "report.html" in result.stdout
    assert json.loads((run / "report.json").read_text()) == json.loads(written["report.json"])
    assert (run / "report.csv").read_text() == written["report.csv"]
    assert (run / "report.html").read_text() == written["report.html"]  # deterministic, figures included
    _assert_self_contained(run)
    csv_lines = written["report.csv"].splitlines()
    assert csv_lines[0].startswith("name,prompt,n,flips,flip_rate,ci_low,ci_high")
    assert csv_lines[1].startswith(f"{PLANTED},") and csv_lines[-1].startswith("null,")


def _one_line(result, *needles):
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zoom: error: ") and "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_zoom_report_bad_input(tmp_path):
    flips = {"hat": pattern(2, 8), "null": pattern(1, 8)}
    # no records at all
    empty = write_run(tmp_path / "empty", flips, images=False)
    (empty / "records" / "rank-0.jsonl").write_text("")
    _one_line(invoke("report", empty), "no finished records")
    # a records folder that never got created
    shutil.rmtree(empty / "records")
    _one_line(invoke("report", empty), "no records/ folder")
    # a truncated line inside the file (a complete line, cut short)
    cut = write_run(tmp_path / "cut", flips, images=False)
    path = cut / "records" / "rank-0.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]) + lines[3][:40] + "\n" + "".join(lines[4:]))
    _one_line(invoke("report", cut), "rank-0.jsonl: line 4", "not valid JSON")
    _one_line(invoke("check", cut, "--max-flip-rate", "0.2"), "line 4")
    _one_line(invoke("compare", cut, empty), "line 4")
    # a line that parses but is not a zoom record
    alien = write_run(tmp_path / "alien", flips, images=False)
    with open(alien / "records" / "rank-0.jsonl", "a") as f:
        f.write('{"key": "x", "attribute": "hat"}\n')
    _one_line(invoke("report", alien), "line 17", "field 'seed' is missing")
    # not a run directory; a directory that does not exist
    (tmp_path / "plain").mkdir()
    _one_line(invoke("report", tmp_path / "plain"), "not a zoom run directory")
    _one_line(invoke("report", tmp_path / "nowhere"), "does not exist")
    for run in (empty, cut, alien, tmp_path / "plain"):  # nothing half-written
        assert not any((run / name).exists() for name in ("report.json", "report.csv", "report.html"))
    # a torn last line (an append cut off by a kill, no newline) is the resume contract: ignored
    torn = write_run(tmp_path / "torn", flips, images=False)
    path = torn / "records" / "rank-0.jsonl"
    text = path.read_text()
    path.write_text(text[: len(text) - 30])
    assert invoke("report", torn).exit_code == 0
    assert json.loads((torn / "report.json").read_text())["completeness"]["finished"] == 15


# ---------------------------------------------------------------------------------------------
# A real browser, offline
# ---------------------------------------------------------------------------------------------


def _browse(path: Path, screenshot: Path):
    """Open a report from disk in headless Chromium with every non-file request aborted; returns facts."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium), as .ci/run does")
    from playwright.sync_api import sync_playwright

    facts = {"console": [], "errors": [], "dialogs": [], "blocked": [], "requests": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900}, offline=True)
            page = context.new_page()

            def route(r):
                facts["requests"].append(r.request.url)
                if r.request.url.startswith(("file://", "data:")):
                    r.continue_()
                else:
                    facts["blocked"].append(r.request.url)
                    r.abort()

            page.route("**/*", route)
            page.on("console", lambda m: facts["console"].append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: facts["errors"].append(str(e)))
            page.on("dialog", lambda d: (facts["dialogs"].append(d.message), d.dismiss()))
            page.goto(path.resolve().as_uri(), wait_until="load")
            for image in page.query_selector_all("img"):  # lazy images load once scrolled into view
                image.scroll_into_view_if_needed()
            page.wait_for_function("[...document.images].every(i => i.complete)", timeout=20_000)
            facts["images"] = page.evaluate("document.images.length")
            facts["broken"] = page.evaluate("[...document.images].filter(i => !(i.naturalWidth > 0))"
                                            ".map(i => i.getAttribute('src').slice(0, 60))")
            facts["scripts"] = page.evaluate("document.scripts.length")
            facts["injected"] = page.evaluate("document.querySelectorAll('img[src=\"x\"], img[onerror]').length")
            facts["h1"] = page.inner_text("h1")
            facts["text"] = page.inner_text("body")
            page.evaluate("window.scrollTo(0, 0)")
            page.wait_for_timeout(100)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    if os.environ.get("ZOOM_ARTIFACTS"):
        folder = Path(__file__).parents[1] / "artifacts"
        folder.mkdir(exist_ok=True)
        shutil.copy(screenshot, folder / screenshot.name)
    return facts


def _assert_clean(facts):
    assert facts["images"] > 3
    assert facts["broken"] == [], facts["broken"]
    assert facts["console"] == [] and facts["errors"] == [], (facts["console"], facts["errors"])
    assert facts["blocked"] == [] and all(u.startswith(("file://", "data:")) for u in facts["requests"])
    assert facts["dialogs"] == [] and facts["scripts"] == 0 and facts["injected"] == 0


def test_report_in_a_real_browser_offline(hostile_run, planted_run, tmp_path):
    hostile = _browse(hostile_run / "report.html", tmp_path / "report-xss-screenshot.png")
    _assert_clean(hostile)
    for name in XSS:  # shown as text, ran nothing
        assert name in hostile["text"]
    assert "Which attributes flip" in hostile["h1"] and "Dose–response" in hostile["text"]

    run, _ = planted_run
    facts = _browse(run / "report.html", tmp_path / "report-screenshot.png")
    _assert_clean(facts)
    # the tiny judge is random: nothing is confirmed, and the verdict says what it counted
    assert PLANTED in facts["text"] and "counting confirmed flips" in facts["text"]
    assert (tmp_path / "report-screenshot.png").stat().st_size > 50_000
    print(f"\nscreenshots: {tmp_path / 'report-screenshot.png'} {tmp_path / 'report-xss-screenshot.png'}")


def test_compare_page_in_a_real_browser_offline(planted_run, blind_run, tmp_path):
    result = invoke("compare", planted_run[0], blind_run[0], "--html", tmp_path / "compare.html")
    assert result.exit_code == 0, result.output
    facts = _browse(tmp_path / "compare.html", tmp_path / "compare-screenshot.png")
    assert facts["broken"] == [] and facts["console"] == [] and facts["blocked"] == [] and facts["scripts"] == 0
    assert PLANTED in facts["text"] and "different" in facts["text"]


# ---------------------------------------------------------------------------------------------
# What README promises about the page's policy, the CSV and the terminal, checked on the files
# ---------------------------------------------------------------------------------------------


def _policy(text: str) -> dict:
    """The page's Content-Security-Policy (one, in a <meta> before anything that loads) as {directive: sources}."""
    page = Page(text)
    policies = [a["content"] for t, a in page.tags if t == "meta" and a.get("http-equiv", "").lower()
                == "content-security-policy"]
    assert len(policies) == 1, policies
    first_loading = min((i for i, (t, _) in enumerate(page.tags) if t in ("img", "style", "link", "script")),
                        default=len(page.tags))
    assert next(i for i, (t, a) in enumerate(page.tags) if a.get("content") == policies[0]) < first_loading
    directives = {}
    for part in policies[0].split(";"):
        words = part.split()
        if words:
            directives[words[0].lower()] = [w.lower() for w in words[1:]]
    return directives


def test_report_and_compare_pages_carry_a_policy_that_forbids_scripts_and_remote_fetches(hostile_run, tmp_path):
    """README: "a Content-Security-Policy forbids scripts and remote fetches". Every fetch directive falls
    back to default-src 'none' unless named; the named ones allow no script and no network source."""
    twin = write_run(tmp_path / "twin", {XSS[0]: pattern(10, 20), XSS[1]: pattern(6, 20),
                                         "rain & fog 100% $x$": pattern(3, 20), "null": pattern(3, 20)}, mode="sweep")
    write_report(twin)
    result = invoke("compare", hostile_run, twin, "--html", tmp_path / "compare.html")
    assert result.exit_code == 0, result.output
    for path in (hostile_run / "report.html", tmp_path / "compare.html"):
        policy = _policy(path.read_text(encoding="utf-8"))
        assert policy.get("default-src") == ["'none'"], (path.name, policy)
        for directive in ("script-src", "script-src-elem", "script-src-attr", "connect-src", "worker-src",
                          "frame-src", "child-src", "object-src", "font-src", "media-src", "manifest-src"):
            assert directive not in policy, (path.name, directive)  # so each is default-src's 'none'
        assert policy.get("base-uri") == ["'none'"] and policy.get("form-action") == ["'none'"]
        allowed = [s for sources in policy.values() for s in sources]
        assert not [s for s in allowed if s in ("*", "http:", "https:", "ws:", "wss:", "blob:")
                    or "://" in s or s.startswith("'unsafe-eval") or s.startswith("'nonce-")], (path.name, policy)
        assert set(policy.get("img-src", [])) <= {"'self'", "data:", "file:"}  # the run's own PNGs and SVG plots
        assert set(policy.get("style-src", [])) <= {"'unsafe-inline'"}


FORMULAS = ["=HYPERLINK(\"http://example.com\",\"x\")", "+1+2", "-2+3", "@SUM(A1:A2)"]


def test_csv_cells_that_start_like_a_formula_get_a_leading_apostrophe(tmp_path):
    import csv

    names = FORMULAS + ["plain name"]
    attributes = [{"name": n, "prompt": (n if n != "plain name" else "a photo of a person's face, plain")}
                  for n in names]
    prompts = {"domain": "a photo of a person's face", "attributes": attributes,
               "null": "a picture of a person's face"}
    run = write_run(tmp_path / "run", {**{n: pattern(3 + i, 16) for i, n in enumerate(names)},
                                       "null": pattern(1, 16)}, prompts=prompts)
    report = write_report(run)
    rows = {row["name"]: row for row in csv.DictReader((run / "report.csv").open(encoding="utf-8", newline=""))}
    for name in FORMULAS:
        assert "'" + name in rows, sorted(rows)  # the name, shown as text by a spreadsheet
        assert rows["'" + name]["prompt"] == "'" + name
    assert rows["plain name"]["prompt"] == "a photo of a person's face, plain"  # the rest untouched
    by_name = {a["name"]: a for a in report["attributes"]}
    for name in names:  # the numbers of each row stay numbers
        row = rows["'" + name if name in FORMULAS else name]
        for column in ("n", "flips", "flip_rate", "ci_low", "ci_high", "p_value"):
            assert float(row[column]) == pytest.approx(by_name[name][column]), (name, column)


def test_control_characters_in_names_are_shown_as_escapes_in_the_terminal_table_and_the_plots(tmp_path):
    """An attribute named with an ANSI escape, a NUL or a bell acts on neither the terminal (zoom report's
    table) nor the SVG plots (raw control characters are not even legal XML): each is shown as an escape."""
    import xml.etree.ElementTree as ET

    names = ["\x1b[31mred\x1b[0m", "nul\x00byte", "bell\x07ring"]
    run = write_run(tmp_path / "run", {names[0]: pattern(12, 16), names[1]: pattern(3, 16), names[2]: pattern(1, 16),
                                       "null": pattern(1, 16)}, mode="sweep")
    result = invoke("report", run)
    assert result.exit_code == 0, result.output
    table = result.stdout
    assert all(c.isprintable() or c == "\n" for c in table), repr(table)
    for shown in ("\\x1b[31mred\\x1b[0m", "nul\\x00byte", "bell\\x07ring"):
        assert shown in table, (shown, table)
    text = (run / "report.html").read_text(encoding="utf-8")
    svgs = [base64.b64decode(u).decode("utf-8") for u in re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"', text)]
    assert len(svgs) >= 2  # the forest plot, dose-response curves (a sweep), the strength histograms
    for svg in svgs:
        assert not [c for c in svg if ord(c) < 32 and c not in "\n\t\r" or c == "\x7f"]
        ET.fromstring(svg)  # well-formed XML
    forest = svgs[0]
    for shown in ("x1b[31mred", "nul", "x00byte", "bell", "x07ring"):
        assert shown in forest, shown


def test_zoom_report_is_refused_while_the_run_is_locked_and_names_the_pid(tmp_path):
    """README: `zoom report` takes the run's lock (the audit's own RunLock, held here by another process), so
    it never races a running audit: it exits 2 saying which pid holds it, and writes nothing. The lock dies
    with its holder. (tests/test_scale.py does the same against a real audit.)"""
    import subprocess
    import sys

    run = write_run(tmp_path / "run", {"hat": pattern(2, 8), "null": pattern(1, 8)})
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom zoom.rundir import RunLock\n"
                               "lock = RunLock(sys.argv[1])\nprint('held', flush=True)\ntime.sleep(120)", str(run)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        _one_line(invoke("report", run), "in use by another zoom process", f"pid {holder.pid})")
        assert not any((run / name).exists() for name in ("report.json", "report.csv", "report.html"))
    finally:
        holder.kill()
        holder.communicate(timeout=60)
    result = invoke("report", run)
    assert result.exit_code == 0, result.output
    assert (run / "report.json").is_file()
