"""Headless Chromium for the page tests: Debian's ``chromium`` package, driven by Playwright for Python.

``npx playwright install`` cannot download browsers here; Playwright drives the system Chromium
through ``executable_path`` instead. On a fresh machine (CI runs ``.ci/run`` on one) the binary is
installed with apt when the tests run as root; otherwise the test fails with the command to run:
a skipped browser test would hide a broken page.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

from playwright.async_api import Page, async_playwright

CHROMIUM = Path("/usr/bin/chromium")
INSTALL_HINT = (
    "the edge page test needs Debian's Chromium at /usr/bin/chromium: run "
    "'sudo apt-get update && sudo apt-get install -y --no-install-recommends chromium' "
    "(and 'pip install -e \".[dev]\"' for the playwright package)"
)
# Flags this machine needs (no GPU, no network but loopback, a fresh profile each run).
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def ensure_chromium(timeout: float = 480) -> tuple[Path, float]:
    """The Chromium binary and the seconds spent installing it (0 when it was there already).

    Raises ``RuntimeError`` with ``INSTALL_HINT`` when it is missing and cannot be installed here.
    """
    if CHROMIUM.exists():
        return CHROMIUM, 0.0
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise RuntimeError(f"Chromium is missing and this is not root with apt-get; {INSTALL_HINT}")
    started = time.monotonic()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        [apt, "update", "-q"],
        [apt, "install", "-y", "-q", "--no-install-recommends", "chromium"],
    ):
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"'{' '.join(command)}' took over {timeout:g}s; {INSTALL_HINT}") from None
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
            raise RuntimeError(f"'{' '.join(command)}' failed:\n{tail}\n{INSTALL_HINT}")
    if not CHROMIUM.exists():
        raise RuntimeError(f"apt-get installed chromium but {CHROMIUM} is missing; {INSTALL_HINT}")
    return CHROMIUM, time.monotonic() - started


@contextlib.asynccontextmanager
async def browser_page(chromium: Path, profile: Path) -> AsyncIterator[Page]:
    """A page in headless Chromium with a new empty profile, closed afterwards."""
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(chromium), headless=True, args=LAUNCH_ARGS
        )
        try:
            yield context.pages[0] if context.pages else await context.new_page()
        finally:
            await context.close()
