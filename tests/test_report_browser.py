"""report.html in a real browser: headless Chromium renders the report of a small demo diagnosis at 1,280 px; the
page loads without errors, does not overflow sideways, shows every image and names report.json's heads in its summary.

Chromium comes from the system (Debian's ``chromium`` package); where it is missing the test installs it with
``apt-get install -y chromium`` when it runs as root with apt-get (set ``ARBITER_NO_BROWSER_INSTALL=1`` to forbid
that), and skips with the reason otherwise. Screenshots (top of the page and the full page, 1,280 px wide) go to
``$ARBITER_REPORT_SCREENSHOTS`` when set, else to the test's temporary folder. ``$ARBITER_REPORT_DIR`` names a
report folder already written (e.g. by a full ``arbiter demo``) to check instead of a small demo run here."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

WIDTH = 1280
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Injected as the first element of <head> in a copy of the page: records script errors, console.error calls and
# resources that fail to load, then, once the page has loaded, writes what the checks need into a <pre>.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(e.target && e.target !== window
  ? 'resource failed: ' + (e.target.src || e.target.href) : 'error: ' + e.message), true);
window.addEventListener('unhandledrejection', e => window.__errors.push('rejection: ' + e.reason));
const __consoleError = console.error;
console.error = (...a) => { window.__errors.push('console.error: ' + a.join(' ')); __consoleError(...a); };
window.addEventListener('load', () => {
  const root = document.documentElement;
  const out = {
    errors: window.__errors,
    innerWidth: window.innerWidth, clientWidth: root.clientWidth, scrollWidth: root.scrollWidth,
    scrollHeight: root.scrollHeight,
    wideBoxes: [...document.querySelectorAll('.table-wrap, figure, p, li, h1, h2, h3')]
      .filter(el => el.scrollWidth > el.clientWidth + 1)
      .map(el => el.tagName + ' ' + el.scrollWidth + '>' + el.clientWidth + ': ' + el.textContent.slice(0, 60)),
    images: [...document.images].map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth})),
    figures: [...document.querySelectorAll('figure')].map(f => ({
      id: f.id, caption: (f.querySelector('figcaption') || {textContent: ''}).textContent.trim()})),
    tables: document.querySelectorAll('table').length,
    pre: document.querySelectorAll('pre').length,
    brokenAnchors: [...document.querySelectorAll('a[href^="#"]')].map(a => a.getAttribute('href').slice(1))
      .filter(id => !document.getElementById(id)),
    summary: (document.querySelector('ul.summary') || {innerText: ''}).innerText,
  };
  const p = document.createElement('pre');
  p.id = '__arbiter_probe';
  p.textContent = JSON.stringify(out);
  document.body.appendChild(p);
});
</script>"""


def _browser() -> str:
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found:
        return found
    if os.environ.get("ARBITER_NO_BROWSER_INSTALL"):
        pytest.skip("no Chromium on PATH and ARBITER_NO_BROWSER_INSTALL is set; install it with "
                    "`apt-get install -y chromium` to run the browser test.")
    if not (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get")):
        pytest.skip("no Chromium on PATH, and this test can install it only as root with apt-get; run "
                    "`sudo apt-get install -y chromium` (Debian/Ubuntu) to run the browser test.")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = ""
    for cmd in (["apt-get", "install", "-y", "chromium"], ["apt-get", "update"],
                ["apt-get", "install", "-y", "chromium"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        log = (r.stdout + r.stderr)[-800:]
        if cmd[1] == "install" and r.returncode == 0:
            break
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if not found:
        pytest.skip(f"Chromium is missing and `apt-get install -y chromium` did not provide it: {log}")
    return found


def _run(browser: str, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--disable-dev-shm-usage", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """A demo report (the shipped organism, a few samples), its report.json and what Chromium saw of it."""
    from arbiter.cli import main

    browser = _browser()
    if os.environ.get("ARBITER_REPORT_DIR"):  # check a report already written, e.g. a fresh clone's `arbiter demo`
        out = Path(os.environ["ARBITER_REPORT_DIR"])
        assert (out / "report.html").is_file() and (out / "report.json").is_file(), out
    else:
        out = tmp_path_factory.mktemp("browser") / "demo"
        rc = main(["demo", "--out", str(out), "--limit", "8", "--random-draws", "2", "--skip", "keyspace,surrogate",
                   "--modality-limit", "4"])
        assert rc == 0
    page = out / "report.html"
    probe = out / "report_probe.html"  # same folder: relative image paths resolve as in the report
    probe.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    r = _run(browser, f"--window-size={WIDTH},900", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="__arbiter_probe">(.*?)</pre>', r.stdout, re.S)
    assert found, f"Chromium returned no probe result (exit {r.returncode}): {r.stderr[-1500:]}"
    import html

    seen = json.loads(html.unescape(found.group(1)))
    shots = Path(os.environ.get("ARBITER_REPORT_SCREENSHOTS") or out)
    shots.mkdir(parents=True, exist_ok=True)
    _run(browser, f"--window-size={WIDTH},1000", f"--screenshot={shots / 'report_top.png'}", page.as_uri())
    _run(browser, f"--window-size={WIDTH},{max(1000, seen['scrollHeight'])}",
         f"--screenshot={shots / 'report_full.png'}", page.as_uri())
    return {"report": json.loads((out / "report.json").read_text()), "seen": seen, "shots": shots,
            "html": page.read_text()}


@pytest.mark.slow
def test_report_loads_without_errors(rendered):
    assert rendered["seen"]["errors"] == []


@pytest.mark.slow
def test_report_has_no_horizontal_overflow_at_1280_px(rendered):
    seen = rendered["seen"]
    assert seen["innerWidth"] == WIDTH                          # the viewport is the width under test
    assert seen["scrollWidth"] <= seen["clientWidth"] <= WIDTH  # nothing wider than the page
    assert seen["wideBoxes"] == []                              # no table or paragraph scrolls or spills inside


@pytest.mark.slow
def test_every_image_is_shown(rendered):
    images = rendered["seen"]["images"]
    n_figures = rendered["html"].count("<img ")
    assert len(images) == n_figures >= 5                        # MAM/LDAR, knockout map, heads, blocking, shapley
    assert [i for i in images if not (i["complete"] and i["width"] > 0)] == []


@pytest.mark.slow
def test_every_figure_has_a_caption_and_every_link_a_target(rendered):
    seen = rendered["seen"]
    assert seen["figures"] and all(f["caption"].startswith("Figure ") and len(f["caption"]) > 40
                                   for f in seen["figures"])
    assert seen["brokenAnchors"] == []


@pytest.mark.slow
def test_tables_are_html_tables_not_preformatted_markdown(rendered):
    seen = rendered["seen"]
    assert seen["tables"] >= 4 and seen["pre"] == 0             # counted before the probe adds its own
    assert "|---|" not in rendered["html"]


@pytest.mark.slow
def test_summary_names_the_heads_of_report_json(rendered):
    rep = rendered["report"]
    topg = rep["blocking"]["heads"]
    assert topg
    names = [f"L{layer}H{head}" for layer, head in topg]
    summary = rendered["seen"]["summary"]
    assert all(n in summary for n in names), (names, summary[:400])
    mf = rep["mfr"]
    assert f"image in {round(100 * mf['vision'])}%" in summary and f"text in {round(100 * mf['text'])}%" in summary


@pytest.mark.slow
def test_screenshots_are_1280_px_wide(rendered):
    from PIL import Image

    top, full = (Image.open(rendered["shots"] / n) for n in ("report_top.png", "report_full.png"))
    assert top.size == (WIDTH, 1000)
    assert full.size[0] == WIDTH and full.size[1] >= rendered["seen"]["scrollHeight"] - 1
