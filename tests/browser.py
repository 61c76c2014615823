"""A real headless browser for the tests: Debian's chromium driven over the Chrome DevTools
Protocol on a pipe (`--remote-debugging-pipe`: requests on fd 3, replies on fd 4, each one
JSON message ending in a NUL byte), so nothing but the standard library is needed.

`open_page(path)` loads a local file and returns what a person would get: the rendered text,
every console error and uncaught exception, every URL the page asked for, and a way to run
script in it and to take a full-page screenshot.
"""
from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

INSTALL_HINT = ("chromium is not installed: `apt-get install --no-install-recommends chromium` "
                "(.ci/run installs it)")


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One chromium process; use as a context manager."""

    def __init__(self, executable: str, width: int = 1280, height: int = 900):
        self._dir = tempfile.mkdtemp(prefix="meshplan-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def wire_fds():   # in the child: its fd 3 reads our requests, its fd 4 writes replies
            a, b = os.dup(to_child_r), os.dup(from_child_w)   # out of the way of 3 and 4 first
            os.dup2(a, 3)
            os.dup2(b, 4)

        # --no-sandbox: chromium refuses its sandbox as root (CI runs as root) and containers often lack
        # the user namespaces it needs; the pages are our own local files. --disable-dev-shm-usage: a
        # container's small /dev/shm would crash a tab drawing thousands of rects.
        args = [executable, "--headless", "--no-sandbox", "--disable-dev-shm-usage", "--remote-debugging-pipe",
                "--disable-gpu", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--hide-scrollbars", f"--user-data-dir={self._dir}", f"--window-size={width},{height}", "about:blank"]
        self.proc = subprocess.Popen(args, preexec_fn=wire_fds, close_fds=False, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_child_r)
        os.close(from_child_w)
        self._next_id = 0
        self._replies: dict = {}
        self._events: queue.Queue = queue.Queue()
        self._lock = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()   # never let stderr fill up

    def _read(self) -> None:
        buffer = b""
        with os.fdopen(self._from_child, "rb", buffering=0) as pipe:
            while True:
                chunk = pipe.read(65536)
                if not chunk:
                    break
                buffer += chunk
                while b"\0" in buffer:
                    raw, buffer = buffer.split(b"\0", 1)
                    message = json.loads(raw)
                    if "id" in message:
                        with self._lock:
                            self._replies[message["id"]] = message
                            self._lock.notify_all()
                    else:
                        self._events.put(message)
        with self._lock:
            self._lock.notify_all()

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout_s: float = 60):
        self._next_id += 1
        ident = self._next_id
        message = {"id": ident, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while ident not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise RuntimeError(f"chromium did not answer {method} (exit code {self.proc.poll()})")
                self._lock.wait(min(left, 0.5))
            reply = self._replies.pop(ident)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def events(self):
        """Every event received so far (drains the queue)."""
        out = []
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out

    def wait_event(self, method: str, session: str, timeout_s: float = 60) -> list:
        """Events up to and including the first `method` of `session`."""
        seen, deadline = [], time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                event = self._events.get(timeout=0.5)
            except queue.Empty:
                continue
            seen.append(event)
            if event.get("method") == method and event.get("sessionId") == session:
                return seen
        raise RuntimeError(f"no {method} within {timeout_s} s")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.call("Browser.close", timeout_s=10)
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_child)
        shutil.rmtree(self._dir, ignore_errors=True)


class Page:
    """A loaded page: .text (rendered innerText), .errors, .requests; evaluate(), screenshot()."""

    def __init__(self, browser: Browser, session: str, events: list):
        self.browser, self.session = browser, session
        self.errors: list[str] = []
        self.requests: list[str] = []
        self._take(events)
        self.text = self.evaluate("document.body.innerText")

    def _take(self, events: list) -> None:
        for event in events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                self.errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert", "warning"):
                self.errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
                self.errors.append(params["entry"]["text"])
            elif method == "Network.requestWillBeSent":
                self.requests.append(params["request"]["url"])

    def evaluate(self, expression: str):
        result = self.browser.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                        "awaitPromise": True}, self.session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        self._take(self.browser.events())
        return result["result"].get("value")

    def screenshot(self, path: Path, width: int = 1280) -> bytes:
        """The whole page, not only the window, as a PNG at `path`."""
        height = int(self.evaluate("Math.ceil(document.documentElement.scrollHeight)"))
        self.browser.call("Emulation.setDeviceMetricsOverride",
                          {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, self.session)
        data = base64.b64decode(self.browser.call("Page.captureScreenshot", {"format": "png"}, self.session)["data"])
        Path(path).write_bytes(data)
        return data


def open_page(browser: Browser, path: Path) -> Page:
    target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Runtime", "Log", "Page", "Network"):
        browser.call(f"{domain}.enable", session=session)
    browser.call("Page.navigate", {"url": Path(path).resolve().as_uri()}, session)
    return Page(browser, session, browser.wait_event("Page.loadEventFired", session))
