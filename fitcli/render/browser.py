"""Loading a page in headless Chromium with the network cut off (the HTML report's tests and
benchmark): what the page's own script recorded, the DOM after it ran, and a screenshot."""

from __future__ import annotations

import json

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "headless_shell")


def find_chromium() -> str | None:
    """A headless-capable Chromium on PATH, or None."""
    import shutil

    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def browser_check(path: str, browser: str, *, fragment: str = "all", screenshot: str | None = None,
                  size: tuple[int, int] = (1280, 2400), budget_ms: int = 15000, timeout: float = 60.0) -> dict:
    """Load the page at ``path`` in headless Chromium with the network cut off and return what the
    page recorded: ``errors``, ``warnings``, ``rendered`` and ``charts`` (counts), ``dom`` (the DOM
    after scripts ran; with the default ``fragment`` ``#all`` every chart is drawn) and ``stderr``.
    With ``screenshot``, the same run also writes a PNG of the first ``size`` pixels."""
    import html as _html
    import re
    import subprocess
    from pathlib import Path

    url = Path(path).resolve().as_uri() + (f"#{fragment}" if fragment else "")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
           "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9", "--disable-extensions",
           f"--virtual-time-budget={budget_ms}", f"--window-size={size[0]},{size[1]}"]
    if screenshot:
        cmd.append(f"--screenshot={screenshot}")
    run = subprocess.run([*cmd, "--dump-dom", url], capture_output=True, text=True, timeout=timeout)
    dom = run.stdout
    m = re.search(r"<html([^>]*)>", dom)
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', m.group(1))) if m else {}

    def j(name: str) -> list:
        return json.loads(_html.unescape(attrs.get(name, "null"))) or []

    return {"errors": j("data-errors") if m else [f"no page loaded (exit {run.returncode}): {run.stderr[-500:]}"],
            "warnings": j("data-warnings"), "rendered": int(attrs.get("data-rendered", -1)),
            "charts": int(attrs.get("data-charts", -1)), "dom": dom, "stderr": run.stderr}
