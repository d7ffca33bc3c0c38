"""A headless Chromium page driven over the DevTools protocol, for tests that use the MLflow UI as a user does.

Only what those tests need: open a URL, wait for text, click what a user would click (a real
mouse event at the element's centre), read the page's text and save a screenshot. The protocol's
websocket is spoken with aiohttp, which MLflow already depends on; the browser is the system's
Chromium (Debian: ``apt-get install chromium``), so nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1600,1000", "--remote-debugging-port=0"]


class Page:
    """One tab of a fresh browser profile (``async with Page(profile) as page``): nothing is saved
    from before, as for a user opening the UI for the first time."""

    def __init__(self, profile: Path, timeout: float = 120):
        self.profile, self.timeout = profile, timeout
        self._ids = itertools.count(1)

    async def __aenter__(self) -> "Page":
        self.browser = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = await asyncio.to_thread(self._debugging_port)
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30).read())
        page = next(t for t in targets if t["type"] == "page")
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        await self.send("Page.enable")
        return self

    def _debugging_port(self) -> int:
        for line in self.browser.stderr:
            found = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if found:
                return int(found.group(1))
        raise RuntimeError(f"Chromium exited with {self.browser.wait()} before it listened")

    async def __aexit__(self, *exc: Any) -> None:
        await self.ws.close()
        await self.session.close()
        self.browser.terminate()
        try:
            self.browser.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.browser.kill()
            self.browser.wait(timeout=30)

    async def send(self, method: str, **params: Any) -> dict:
        """One protocol command; its result (events that arrive meanwhile are dropped)."""
        msg_id = next(self._ids)
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self.ws.receive_json(), self.timeout)
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def text(self) -> str:
        return await self.evaluate("document.body ? document.body.innerText : ''")

    async def url(self) -> str:
        return await self.evaluate("location.href")

    async def wait_for(self, expression: str, what: str) -> Any:
        """Poll a JavaScript expression until it is truthy (the UI renders asynchronously)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while loop.time() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.5)
        raise AssertionError(f"{what} not shown in {self.timeout:.0f} s; the page at {await self.url()} shows:\n"
                             f"{(await self.text())[:2000]}")

    async def wait_for_text(self, *texts: str) -> None:
        await self.wait_for(" && ".join(f"document.body && document.body.innerText.includes({json.dumps(t)})"
                                        for t in texts), f"text {texts}")

    async def click(self, selector: str, text: str, until: str) -> None:
        """Click, with the mouse, the first element matching ``selector`` whose text is ``text``, until
        the JavaScript expression ``until`` holds (again if the page moved under the pointer, as a
        user would: the UI lays itself out while it loads)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while loop.time() < deadline:
            box = await self.wait_for(
                f"""(() => {{
                    const el = [...document.querySelectorAll({json.dumps(selector)})]
                        .find(e => e.innerText.trim() === {json.dumps(text)});
                    if (!el) return null;
                    el.scrollIntoView({{block: 'center'}});
                    const r = el.getBoundingClientRect();
                    return [r.x + r.width / 2, r.y + r.height / 2];
                }})()""", f"{selector} {text!r}")
            for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
                await self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)
            for _ in range(10):
                if await self.evaluate(until):
                    return
                await asyncio.sleep(0.5)
        raise AssertionError(f"clicking {text!r} did not lead to {until}; the page at {await self.url()} shows:\n"
                             f"{(await self.text())[:2000]}")

    async def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode((await self.send("Page.captureScreenshot", format="png"))["data"]))
