#!/usr/bin/env python3
"""Check the built book: offline-only HTML, then every page in headless Chromium.

Usage: python scripts/check_book.py [--html _build/html] [--out _build/check] [--no-browser]

1. Static: no built HTML page may load a script, stylesheet or frame from the network
   (``<script src="https://...">``, ``<link rel=stylesheet href="//...">``, ...). The book must work
   offline: ipywidgets' JS is vendored (book/_vendor). plotly.js is one file of the site
   (``_static/plotly.min.js``): a page with a plotly figure must load it from there, and no page may
   inline its own copy (4.8 MB a page). Every notebook a page offers for download (``_notebooks/*.ipynb``) is
   in the build, and a notebook with outputs (``*.outputs.ipynb``) shows values, not raw glue roles.
2. Browser: every page of _toc.yml is opened in headless Chromium with every host name unresolvable
   (so nothing can come from the internet). The Chrome DevTools protocol, spoken over
   ``--remote-debugging-pipe`` with the standard library only, collects console errors, uncaught
   exceptions and failed loads; then the page is checked: on a page with plotly figures every figure
   drew (``.main-svg``), on a page with saved widget state the widgets drew (``.widget-*`` elements,
   and no "Error displaying widget"). A full-page screenshot of each page goes to ``OUT/screenshots``
   and a JSON report to ``OUT/report.json``.

Exit status 1 if any check fails. Chromium is Debian's ``chromium`` (``apt-get install -y chromium``;
the CI script installs it); ``$CHROMIUM`` names another binary.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

REMOTE = re.compile(
    r"<(script|iframe|img|link)\b[^>]*?\b(src|href)\s*=\s*[\"']?(?P<url>(?:https?:)?//[^\"'\s>]+)", re.I)


def toc_pages(toc: Path) -> list[str]:
    """Every file listed in _toc.yml (root first), without its extension."""
    import yaml

    data = yaml.safe_load(toc.read_text())
    pages = [data["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                pages.append(node["file"])
            for key in ("chapters", "sections", "parts"):
                for child in node.get(key, []) or []:
                    walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk({k: v for k, v in data.items() if k != "root"})
    return [str(Path(p).with_suffix("")) if Path(p).suffix in (".md", ".ipynb") else p for p in pages]


PLOTLY_BUNDLE = re.compile(r"\*\s*plotly\.js v\d")  # the licence header that opens plotly.min.js
PLOTLY_SCRIPT = re.compile(r"<script\b[^>]*\bsrc=[\"'][^\"']*_static/plotly\.min\.js", re.I)


def plotly_problems(html: str, page: Path, root: Path) -> list[str]:
    """plotly.js once per site: figures need the site's copy, and no page inlines its own."""
    bad = []
    if PLOTLY_BUNDLE.search(html):
        bad.append("inlines plotly.js (figures must use the site's _static/plotly.min.js)")
    if 'class="plotly-graph-div"' in html:
        if not PLOTLY_SCRIPT.search(html):
            bad.append("has a plotly figure but does not load _static/plotly.min.js")
        elif not (root / "_static" / "plotly.min.js").is_file():
            bad.append("_static/plotly.min.js is missing from the build")
    return bad


NOTEBOOK_LINK = re.compile(r"href\s*=\s*[\"'](?P<url>[^\"'#?]*_notebooks/[^\"'#?]+\.ipynb)[\"']", re.I)
GLUE_ROLE = re.compile(r"\{glue(?::[a-z]*)?\}`")  # a role the book's extension pastes into the outputs notebook


def notebook_problems(html: str, page: Path) -> list[str]:
    """The page's notebook downloads: each link's file exists; a notebook with outputs has no raw glue role."""
    import json

    bad = []
    for url in dict.fromkeys(m.group("url") for m in NOTEBOOK_LINK.finditer(html)):
        target = (page.parent / url).resolve()
        if not target.is_file():
            bad.append(f"offers {url} but the build has no such notebook")
        elif target.name.endswith(".outputs.ipynb"):
            cells = json.loads(target.read_text(encoding="utf8")).get("cells", [])
            raw = [m.group(0) for c in cells if c.get("cell_type") == "markdown"
                   for m in GLUE_ROLE.finditer("".join(c.get("source", "")))]
            if raw:
                bad.append(f"{url} shows {len(raw)} raw glue role(s) (first: {raw[0]}...)")
    return bad


def remote_loads(html: str) -> list[str]:
    """Resources a page would load from the network (scripts, frames, images, stylesheets)."""
    bad = []
    for m in REMOTE.finditer(html):
        tag = m.group(1).lower()
        if tag == "link":
            start = m.start()
            element = html[start: html.find(">", start) + 1]
            if not re.search(r"rel\s*=\s*[\"']?(stylesheet|preload|modulepreload|icon)", element, re.I):
                continue  # an ordinary hyperlink-like <link> (canonical, etc.) loads nothing
        bad.append(f"<{tag}> {m.group('url')}")
    return bad


# ----------------------------------------------------------------------------- DevTools over a pipe
class Chrome:
    """A headless Chromium driven through ``--remote-debugging-pipe`` (fd 3 in, fd 4 out)."""

    def __init__(self, binary: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="attnlens-chromium-")
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def fds() -> None:  # runs in the child, before exec: the pipe ends become fds 3 and 4
            high_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
            high_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)  # dup2 to another number: inheritable (no close-on-exec)
            os.dup2(high_w, 4)

        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--host-resolver-rules=MAP * ~NOTFOUND",  # nothing resolves: an offline reader
                "--allow-file-access-from-files", f"--user-data-dir={self.profile}", "about:blank"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, close_fds=False, preexec_fn=fds)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _read_message(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self._r], [], [], left)
            if not ready:
                return None
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe (did it crash?)")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(max(0.0, deadline - time.monotonic()))
            if reply is None:
                raise TimeoutError(f"no reply to {method} in {timeout} s")
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def pump(self, seconds: float) -> None:
        """Collect events for ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            msg = self._read_message(left)
            if msg is not None:
                self.events.append(msg)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)


def _console_text(params: dict) -> str:
    parts = []
    for arg in params.get("args", []):
        parts.append(str(arg.get("value", arg.get("description", arg.get("type", "")))))
    return " ".join(parts)


def check_page(chrome: Chrome, path: Path, shot: Path, expect_plotly: int, expect_widgets: bool,
               wait: float) -> dict:
    """Open one page; return what was seen and the failures."""
    target = chrome.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = chrome.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    chrome.events.clear()
    for method in ("Runtime.enable", "Log.enable", "Page.enable"):
        chrome.call(method, session=session)
    chrome.call("Emulation.setDeviceMetricsOverride",
                {"width": 1280, "height": 1000, "deviceScaleFactor": 1, "mobile": False}, session=session)
    chrome.call("Page.navigate", {"url": path.as_uri()}, session=session)
    probe = ("JSON.stringify({svg: document.querySelectorAll('.plotly-graph-div .main-svg').length,"
             " drawn: Array.from(document.querySelectorAll('.plotly-graph-div'))"
             "        .filter(d => d.querySelector('.main-svg')).length,"
             " widgets: document.querySelectorAll('[class*=\"widget-\"]').length,"
             " widget_errors: (document.body.innerText.match(/Error displaying widget/g) || []).length,"
             " ready: document.readyState})")
    seen: dict = {}
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        chrome.pump(0.5)
        res = chrome.call("Runtime.evaluate", {"expression": probe, "returnByValue": True}, session=session)
        seen = json.loads(res.get("result", {}).get("value", "{}") or "{}")
        if (seen.get("ready") == "complete" and seen.get("drawn", 0) >= expect_plotly
                and (not expect_widgets or seen.get("widgets", 0) > 0)):
            break
    chrome.pump(1.0)  # late errors
    errors, warnings = [], []
    for ev in chrome.events:
        if ev.get("sessionId") != session:
            continue
        method, params = ev.get("method"), ev.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = _console_text(params)
            if params.get("type") in ("error", "assert"):
                errors.append(f"console.{params['type']}: {text}")
            elif params.get("type") == "warning":
                warnings.append(f"console.warn: {text}")
        elif method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            errors.append("uncaught: " + str(d.get("exception", {}).get("description") or d.get("text")))
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            line = f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip()
            (errors if entry.get("level") == "error" else warnings).append(line)
    metrics = chrome.call("Page.getLayoutMetrics", session=session)
    height = int(min(metrics.get("cssContentSize", {}).get("height", 1000), 12000))
    chrome.call("Emulation.setDeviceMetricsOverride",
                {"width": 1280, "height": max(height, 600), "deviceScaleFactor": 1, "mobile": False}, session=session)
    chrome.pump(0.3)
    png = chrome.call("Page.captureScreenshot", {"format": "png"}, session=session, timeout=60)["data"]
    shot.parent.mkdir(parents=True, exist_ok=True)
    shot.write_bytes(base64.b64decode(png))
    chrome.call("Target.closeTarget", {"targetId": target})
    failures = list(errors)
    if seen.get("drawn", 0) < expect_plotly:
        failures.append(f"plotly: {seen.get('drawn', 0)} of {expect_plotly} figures drew")
    if expect_widgets and not seen.get("widgets"):
        failures.append("widgets: the saved widget state did not draw (no .widget-* element)")
    if seen.get("widget_errors"):
        failures.append(f"widgets: {seen['widget_errors']} 'Error displaying widget'")
    return {"seen": seen, "errors": errors, "warnings": warnings, "failures": failures, "screenshot": str(shot)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--html", type=Path, default=ROOT / "_build" / "html")
    ap.add_argument("--out", type=Path, default=ROOT / "_build" / "check")
    ap.add_argument("--toc", type=Path, default=ROOT / "_toc.yml")
    ap.add_argument("--no-browser", action="store_true", help="only the static checks")
    ap.add_argument("--wait", type=float, default=20.0, help="seconds a page may take to draw")
    args = ap.parse_args(argv)

    failures: dict[str, list[str]] = {}
    pages = sorted(args.html.rglob("*.html"))
    if not pages:
        print(f"check_book: no HTML under {args.html}: build the book first (scripts/book.sh)")
        return 1
    for page in pages:
        html = page.read_text(errors="replace")
        bad = [f"loads from the network: {b}" for b in remote_loads(html)] + plotly_problems(html, page, args.html)
        bad += notebook_problems(html, page)
        if bad:
            failures.setdefault(str(page.relative_to(args.html)), []).extend(bad)
    print(f"static: {len(pages)} HTML files, {len(failures)} load something from the network, mishandle plotly.js "
          "or offer a missing or raw notebook")

    report: dict = {"static_failures": dict(failures), "pages": {}}
    chapters = toc_pages(args.toc)
    missing = [c for c in chapters if not (args.html / f"{c}.html").exists()]
    for c in missing:
        failures.setdefault(c, []).append("listed in _toc.yml but not built")
    if not args.no_browser:
        binary = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
        if not binary:
            print("check_book: chromium not found (apt-get install -y chromium, or set $CHROMIUM)")
            return 1
        chrome = Chrome(binary)
        try:
            for c in chapters:
                path = args.html / f"{c}.html"
                if not path.exists():
                    continue
                html = path.read_text(errors="replace")
                n_plotly = html.count('class="plotly-graph-div"')
                widgets = "application/vnd.jupyter.widget-state+json" in html
                shot = args.out / "screenshots" / f"{c.replace('/', '__')}.png"
                t0 = time.monotonic()
                res = check_page(chrome, path, shot, n_plotly, widgets, args.wait)
                res.update(plotly_figures=n_plotly, widget_state=widgets, seconds=round(time.monotonic() - t0, 1))
                report["pages"][c] = res
                if res["failures"]:
                    failures.setdefault(c, []).extend(res["failures"])
                status = "FAIL" if res["failures"] else "ok"
                print(f"{status:4} {c}: plotly {res['seen'].get('drawn', 0)}/{n_plotly}, "
                      f"widget elements {res['seen'].get('widgets', 0)}{' (state saved)' if widgets else ''}, "
                      f"console errors {len(res['errors'])}, warnings {len(res['warnings'])}, {res['seconds']} s")
        finally:
            chrome.close()
    report["failures"] = failures
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    for page, items in failures.items():
        for item in items:
            print(f"FAIL {page}: {item}")
    print(f"check_book: {'FAILED' if failures else 'passed'}; report in {args.out / 'report.json'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
