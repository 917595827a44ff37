"""Open a camshaft report in headless Chromium: fail on console errors, broken links or images,
or any request leaving the report folder; save a screenshot of each page checked.

    python scripts/check_report.py REPORT_DIR [--screenshots DIR] [--pages N] [--width 1280]

Talks to Chromium over the DevTools protocol on a pipe (``--remote-debugging-pipe``), so it needs
nothing beyond the standard library and a Chromium binary (``apt-get install -y chromium``; or
set CHROMIUM to its path). Exit status: 0 clean, 1 problems found (listed), 2 no Chromium / bad
arguments.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--remote-debugging-pipe",
    "--hide-scrollbars", "--mute-audio",
)
BROKEN_IMAGES = "[...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)"
LINKS = "[...document.querySelectorAll('a[href]')].map(a => a.href)"


def find_browser() -> str | None:
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


class DevTools:
    """A Chromium process and its DevTools pipe: ``send`` a command, events are collected."""

    def __init__(self, binary: str, *, timeout: float = 60.0):
        self.timeout, self.events, self._next, self._buffer = timeout, [], 0, b""
        self._profile = tempfile.mkdtemp(prefix="camshaft-chromium-")
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()

        def wire():  # the browser reads commands on fd 3 and writes replies on fd 4
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser)]
            for fd, wanted in zip(high, (3, 4), strict=True):
                os.dup2(fd, wanted)
                os.set_inheritable(wanted, True)

        self.process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=wire, close_fds=False,
        )
        os.close(to_browser)
        os.close(from_browser)

    def send(self, method: str, params: dict | None = None, *, session: str | None = None) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive(time.monotonic() + self.timeout)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, *, seconds: float) -> bool:
        """Collect events until ``method`` arrives (True) or ``seconds`` pass (False)."""
        deadline = time.monotonic() + seconds
        if any(e.get("method") == method for e in self.events):
            return True
        while time.monotonic() < deadline:
            try:
                event = self._receive(deadline)
            except TimeoutError:
                return False
            self.events.append(event)
            if event.get("method") == method:
                return True
        return False

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)


def problems_of(events: list[dict], folder: Path) -> list[str]:
    """Console errors, exceptions, failed loads and requests that leave ``folder``."""
    found = []
    for e in events:
        method, p = e.get("method"), e.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            found.append("console error: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            found.append("exception: " + p.get("exceptionDetails", {}).get("text", ""))
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            found.append(f"console error: {p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
        elif method == "Network.loadingFailed":
            found.append(f"failed to load: {p.get('errorText')} (request {p.get('requestId')})")
        elif method == "Network.requestWillBeSent":
            url = p.get("request", {}).get("url", "")
            if not _inside(url, folder):
                found.append(f"request outside the report folder: {url}")
    return found


def _inside(url: str, folder: Path) -> bool:
    parsed = urlparse(url)
    if parsed.scheme in ("data", "about"):
        return True
    if parsed.scheme != "file":
        return False
    return Path(unquote(parsed.path)).resolve().is_relative_to(folder.resolve())


def check_page(tools: DevTools, session: str, page: Path, folder: Path, screenshot: Path | None) -> list[str]:
    """Load one page; its problems (an empty list when clean)."""
    tools.events.clear()
    tools.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
    if not tools.wait_for("Page.loadEventFired", seconds=tools.timeout):
        return [f"{page.name}: did not finish loading in {tools.timeout:.0f} s"]
    tools.wait_for("Never.arrives", seconds=0.3)  # late console messages
    found = [f"{page.name}: {p}" for p in problems_of(tools.events, folder)]
    broken = _evaluate(tools, session, BROKEN_IMAGES)
    found += [f"{page.name}: broken image {src}" for src in broken]
    for href in _evaluate(tools, session, LINKS):
        parsed = urlparse(href)
        if parsed.scheme == "file" and not Path(unquote(parsed.path)).exists():
            found.append(f"{page.name}: broken link {href}")
        elif parsed.scheme not in ("file", "data", "about"):
            found.append(f"{page.name}: link outside the report {href}")
    if screenshot is not None:
        size = tools.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 12000), "scale": 1}
        shot = tools.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}, session=session)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
    return found


def _evaluate(tools: DevTools, session: str, expression: str) -> list:
    result = tools.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
    return result.get("result", {}).get("value") or []


def check_report(folder: Path, *, screenshots: Path | None = None, pages: int | None = None, width: int = 1280) -> list[str]:
    """Check ``folder/index.html`` and the other pages (``pages`` at most); returns the problems."""
    binary = find_browser()
    if binary is None:
        raise FileNotFoundError("no Chromium found: apt-get install -y chromium, or set CHROMIUM=/path/to/chrome")
    index = folder / "index.html"
    if not index.exists():
        return [f"{index} does not exist"]
    others = sorted(p for p in folder.glob("*.html") if p.name != "index.html")
    todo = [index, *others][: pages or None]
    if screenshots is not None:
        screenshots.mkdir(parents=True, exist_ok=True)
    tools = DevTools(binary)
    try:
        target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            tools.send(f"{domain}.enable", session=session)
        tools.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=session)
        found = []
        for page in todo:
            shot = None if screenshots is None else screenshots / f"{page.stem}.png"
            found += check_page(tools, session, page, folder, shot)
        return found
    finally:
        tools.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="the report folder (with index.html)")
    parser.add_argument("--screenshots", type=Path, help="save a PNG of each page checked into this folder")
    parser.add_argument("--pages", type=int, help="check at most this many pages (index first)")
    parser.add_argument("--width", type=int, default=1280, help="viewport width in CSS pixels")
    args = parser.parse_args(argv)
    try:
        found = check_report(args.report, screenshots=args.screenshots, pages=args.pages, width=args.width)
    except FileNotFoundError as e:
        print(f"check_report: {e}", file=sys.stderr)
        return 2
    for p in found:
        print(p)
    print(f"{'FAILED' if found else 'OK'}: {len(found)} problem(s) in {args.report}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
