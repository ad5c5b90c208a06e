"""A headless Chromium for tests, driven through the DevTools protocol over a pipe.

`--remote-debugging-pipe` makes Chromium read protocol commands from file descriptor 3 and write
replies and events to descriptor 4 (Playwright's own transport), one JSON message per NUL-terminated chunk. That needs no
Python package, no port and no browser download (Playwright's Python package would bring a
Node.js driver and its own pinned browser builds): only Debian's `chromium`, which `.ci/run`
installs. Where it is absent the tests that use it skip with the reason, and fail under CI.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str:
    """The Chromium executable, or a skip (a failure under CI, where `.ci/run` installs it)."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    reason = "no chromium on PATH (install Debian's package: apt-get install chromium)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must not skip: {reason}")
    pytest.skip(reason)


class Chromium:
    """One headless browser with one page (tab), and the few protocol calls the tests need.

    Args:
        profile: an empty folder for the browser profile (localStorage lives there).
        downloads: where downloaded files are saved, under their suggested names.
    """

    def __init__(self, profile: Path, downloads: Path, timeout: float = 30.0) -> None:
        self.timeout, self.next_id, self.buffer = timeout, 0, b""
        self.events: list[dict[str, Any]] = []
        arguments = [
            find_chromium(),
            "--headless",
            "--remote-debugging-pipe",
            "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            f"--user-data-dir={profile}",
            "about:blank",
        ]
        # The shell moves the two pipes (stdin, stdout) to descriptors 3 and 4 and silences 0 and 1.
        self.process = subprocess.Popen(
            ["sh", "-c", 'exec "$@" 3<&0 4>&1 0</dev/null 1>/dev/null', "sh", *arguments],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.commands, self.replies = self.process.stdin.fileno(), self.process.stdout.fileno()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        downloads.mkdir(parents=True, exist_ok=True)
        self.call(
            "Browser.setDownloadBehavior", behavior="allow", downloadPath=str(downloads), eventsEnabled=True
        )
        self.call("Page.enable", session=True)
        self.call("Runtime.enable", session=True)

    def _receive(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.replies], [], [], remaining)[0]:
                raise TimeoutError(f"chromium did not answer within {self.timeout:g} s")
            chunk = os.read(self.replies, 1 << 16)
            if not chunk:
                raise ConnectionError("chromium closed the pipe")
            self.buffer += chunk
        message, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(message)

    def call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        """Sends one command (to the page when `session`) and returns its result; keeps events."""
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for_event(self, method: str) -> dict[str, Any]:
        """The first event called `method` since the last wait (received now or earlier)."""
        while True:
            for index, event in enumerate(self.events):
                if event.get("method") == method:
                    del self.events[: index + 1]
                    return event.get("params", {})
            self.events.append(self._receive())

    def open(self, path: Path) -> None:
        """Loads a local file and waits for its load event."""
        self.events.clear()
        self.call("Page.navigate", session=True, url=path.resolve().as_uri())
        self.wait_for_event("Page.loadEventFired")

    def reload(self) -> None:
        self.events.clear()
        self.call("Page.reload", session=True)
        self.wait_for_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises are awaited)."""
        result = self.call(
            "Runtime.evaluate", session=True, expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def type_text(self, text: str) -> None:
        """Types into the focused element as a keyboard would insert text."""
        self.call("Input.insertText", session=True, text=text)

    def press(self, key: str) -> None:
        """Presses and releases one key (a digit, "Enter" or "Tab") on the focused element."""
        codes = {"Enter": ("Enter", 13, "\r"), "Tab": ("Tab", 9, "")}
        code, key_code, text = codes[key] if key in codes else (f"Digit{key}", ord(key), key)
        common = {"key": key, "code": code, "windowsVirtualKeyCode": key_code}
        self.call("Input.dispatchKeyEvent", session=True, type="keyDown", text=text, **common)
        self.call("Input.dispatchKeyEvent", session=True, type="keyUp", **common)

    def wait_for_download(self) -> str:
        """Waits until a download completes; returns its suggested file name."""
        name = self.wait_for_event("Browser.downloadWillBegin")["suggestedFilename"]
        while self.wait_for_event("Browser.downloadProgress").get("state") != "completed":
            pass
        return str(name)

    def close(self) -> None:
        with contextlib.suppress(ConnectionError, TimeoutError, RuntimeError, OSError):
            self.call("Browser.close")
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()
