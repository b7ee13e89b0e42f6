"""The HTML report in a real browser: headless Chromium, no Node, no websocket client.

The test copies report.html, injects two scripts (an ``onerror`` collector first in <head>, a
self-check at the end of <body> that runs on ``load``), and lets Chromium ``--dump-dom`` the page;
the self-check writes its findings as JSON into a <pre> the test then reads: script errors, every
<img> decoded (``complete && naturalWidth > 0``), and a programmatic click on the ``speedup`` header
sorting the summary table ascending, then descending. A second Chromium call takes a screenshot
(kept in the test's tmp dir, and in $CPBENCH_SCREENSHOT_DIR when set).

Skipped when Chromium is not installed (Debian package ``chromium``).
"""
from __future__ import annotations

import html as htmlmod
import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cpbench.report import write_report

pytestmark = pytest.mark.browser

_spec = importlib.util.spec_from_file_location("_report_rows", Path(__file__).with_name("_report_rows.py"))
R = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(R)


def _chromium() -> str | None:
    for c in (os.environ.get("CPBENCH_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
              shutil.which("chromium-browser")):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


CHROMIUM = _chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not found (/usr/bin/chromium; apt-get install chromium)")

_PRE = """<script>window.__errs=[];window.onerror=function(m,s,l,c,e){window.__errs.push(String(m));};
window.addEventListener('error',function(e){if(e.target&&e.target!==window)window.__errs.push('resource: '+(e.target.src||e.target.href));},true);
console.error=function(){window.__errs.push('console.error: '+Array.prototype.join.call(arguments,' '));};</script>"""

_POST = """<pre id="cpbench-selftest"></pre><script>
window.addEventListener('load',function(){
  var out={errors:window.__errs};
  try{
    var imgs=Array.prototype.slice.call(document.images);
    out.images=imgs.length;
    out.images_ok=imgs.filter(function(i){return i.complete&&i.naturalWidth>0;}).length;
    var t=document.getElementById('summary'),ths=Array.prototype.slice.call(t.tHead.rows[0].cells);
    out.headers=ths.map(function(h){return h.textContent.trim();});
    var col=out.headers.indexOf('speedup');
    function column(){return Array.prototype.map.call(t.tBodies[0].rows,function(r){return r.cells[col].getAttribute('data-v');});}
    out.before=column();
    ths[col].click(); out.asc=column(); out.asc_mark=ths[col].getAttribute('aria-sort');
    ths[col].click(); out.desc=column(); out.desc_mark=ths[col].getAttribute('aria-sort');
    var r=ths[col].getBoundingClientRect(), v=document.getElementById('verdict').getBoundingClientRect();
    out.speedup_rect=[r.left,r.right,r.top]; out.viewport=[window.innerWidth,window.innerHeight];
    out.verdict_top=v.top;
    var dc=out.headers.indexOf('decomposer');
    ths[dc].click(); out.by_decomposer=Array.prototype.map.call(t.tBodies[0].rows,function(r){return r.cells[dc].textContent;});
    out.rows=t.tBodies[0].rows.length;
  }catch(e){out.errors.push('selftest: '+e);}
  document.getElementById('cpbench-selftest').textContent=JSON.stringify(out);
});
</script>"""


def _flags(tmp: Path) -> list[str]:
    return [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'chromium-profile'}"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, env={**os.environ, "LANG": "C.UTF-8"})


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run = R.write_run(tmp_path_factory.mktemp("browser") / "run", R.synthetic_rows())
    write_report(run, formats=["html"])
    return run / "report" / "report.html"


@needs_chromium
def test_report_in_headless_chromium(report, tmp_path):
    page = report.read_text(encoding="utf-8")
    page = page.replace("<head>", "<head>" + _PRE, 1).replace("</body>", _POST + "</body>", 1)
    probe = tmp_path / "probe.html"
    probe.write_text(page, encoding="utf-8")
    proc = _run(_flags(tmp_path) + ["--window-size=1280,900", "--virtual-time-budget=5000", "--dump-dom",
                                    probe.as_uri()])
    m = re.search(r'<pre id="cpbench-selftest">(.*?)</pre>', proc.stdout, re.S)
    assert m and m.group(1), f"the self-check did not run; chromium rc={proc.returncode}, stderr tail: {proc.stderr[-800:]}"
    res = json.loads(htmlmod.unescape(m.group(1)))
    assert res["errors"] == []
    assert res["images"] == 4 and res["images_ok"] == 4
    assert res["rows"] == 5 and res["headers"][:3] == ["model", "decomposer", "rank"]
    # the speedup column is in view on a 1280-pixel-wide window without scrolling sideways, and the
    # verdict opens the page
    left, right, _ = res["speedup_rect"]
    assert 0 <= left < right <= res["viewport"][0] == 1280, res["speedup_rect"]
    assert 0 <= res["verdict_top"] < 300
    sp = sorted(r["speedup"] for r in R.synthetic_rows() if r["status"] == "ok")
    # ascending, the failed cell's empty speedup last; then descending, empty still last
    assert [float(v) for v in res["asc"][:4]] == sp and res["asc"][4] == "" and res["asc_mark"] == "ascending"
    assert [float(v) for v in res["desc"][:4]] == sp[::-1] and res["desc"][4] == ""
    assert res["desc_mark"] == "descending"
    assert res["by_decomposer"] == sorted(res["by_decomposer"])


@needs_chromium
def test_report_screenshot(report, tmp_path):
    shot = tmp_path / "report.png"
    proc = _run(_flags(tmp_path) + ["--hide-scrollbars", "--window-size=1280,2400", "--virtual-time-budget=3000",
                                    f"--screenshot={shot}", report.as_uri()])
    assert shot.is_file(), f"no screenshot; chromium rc={proc.returncode}, stderr tail: {proc.stderr[-800:]}"
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1280, 2400)
        colours = im.convert("RGB").resize((64, 120)).getcolors(64 * 120)
        assert colours is not None and len(colours) > 20  # a rendered page, not a blank one
    if os.environ.get("CPBENCH_SCREENSHOT_DIR"):
        dest = Path(os.environ["CPBENCH_SCREENSHOT_DIR"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, dest / "report.png")


@needs_chromium
def test_speedup_column_visible_in_the_screenshot(report, tmp_path):
    """Looked for in the screenshot itself: the summary table's speedup header painted a colour nothing
    else on the page has, then found among the pixels of a 1280-pixel-wide page (not off to the right,
    no sideways scrolling); and the verdict's speedups in the first 900 pixels."""
    page = report.read_text(encoding="utf-8").replace(
        "</style>", 'th[data-col="speedup"]{background:#ff00ff !important;color:#ff00ff}'
                    '#verdict td.sp{background:#00ffff !important;color:#00ffff}</style>', 1)
    probe = tmp_path / "marked.html"
    probe.write_text(page, encoding="utf-8")
    shot = tmp_path / "marked.png"
    proc = _run(_flags(tmp_path) + ["--hide-scrollbars", "--window-size=1280,2400", "--virtual-time-budget=3000",
                                    f"--screenshot={shot}", probe.as_uri()])
    assert shot.is_file(), f"no screenshot; chromium rc={proc.returncode}, stderr tail: {proc.stderr[-800:]}"
    from PIL import Image

    with Image.open(shot) as im:
        rgb = im.convert("RGB")
        assert rgb.size == (1280, 2400)
        px = rgb.load()

        def painted(colour):
            return [(x, y) for x in range(0, 1280, 2) for y in range(0, 2400, 2) if px[x, y] == colour]

        magenta, cyan = painted((255, 0, 255)), painted((0, 255, 255))
    assert len(magenta) > 50, "the summary table's speedup header is not in the screenshot"
    assert max(x for x, _ in magenta) < 1280 - 2  # wholly in view, not cut at the right edge
    assert len(cyan) > 50 and max(y for _, y in cyan) < 900, "the verdict's speedups are not on the first screen"
    if os.environ.get("CPBENCH_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["CPBENCH_SCREENSHOT_DIR"]) / "marked.png")
