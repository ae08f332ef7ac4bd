"""The demo as a user sees it: uvicorn serves the pages, headless Chromium loads them.

The server is the demo's own ASGI application on a free loopback port, over a fresh
SQLite catalogue; Chromium and its driver are Debian's (``chromium``,
``chromium-driver``), installed with apt-get when missing, because a browser that a
test tool downloads for itself cannot be fetched here. Screenshots go to
``test-output/example_project/``.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.browser

PROJECT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: Enough for tens of ms per query in the screenshots, quick to generate.
BOOKS = int(os.environ.get("DEMO_TEST_BOOKS", "60000"))
#: The order the pages are loaded in: the last one compares all three.
PAGES = ("sync", "gather", "background")
QUERIES = 6


def _ensure_chromium() -> None:
    """Install Debian's chromium and chromium-driver if either is missing."""
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return
    if os.geteuid() != 0:
        pytest.fail(
            "Chromium is missing: sudo apt-get install -y chromium chromium-driver"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"],
    ):
        subprocess.run(command, check=True, env=env, timeout=900)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_served(
    url: str, server: subprocess.Popen[bytes], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the demo server exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)  # polling interval, bounded by the deadline above
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def _stop(server: subprocess.Popen[bytes]) -> None:
    server.send_signal(signal.SIGINT)  # uvicorn's own Ctrl-C shutdown
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=15)


def _start_server(
    env: dict[str, str], logs: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """uvicorn on a free port; a port picked here may be taken first, so try a few."""
    for _attempt in range(3):
        port = _free_port()
        with open(logs / f"uvicorn-{port}.log", "wb") as log:
            server = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "bookshop.asgi:application",
                    "--host=127.0.0.1",
                    f"--port={port}",
                    "--lifespan=off",
                ],
                cwd=PROJECT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_until_served(f"{url}/sync/", server, timeout=60)
        except RuntimeError:
            continue  # it exited: most likely the port was taken
        except BaseException:
            _stop(server)
            raise
        return server, url
    output = (logs / f"uvicorn-{port}.log").read_text(errors="replace")
    raise RuntimeError(f"uvicorn did not start; its output:\n{output[-3000:]}")


@pytest.fixture(scope="module")
def demo_server() -> Iterator[str]:
    """The demo's ASGI app under uvicorn, as ``make demo`` serves it; its base URL."""
    with tempfile.TemporaryDirectory(prefix="bookshop-demo-") as tmp:
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "bookshop.settings",
            "DATABASE_URL": f"sqlite:///{tmp}/bookshop.sqlite3",
        }
        manage = [sys.executable, "manage.py"]
        for command in (
            [*manage, "migrate", "--no-input", "-v0"],
            [*manage, "generate_catalogue", "--books", str(BOOKS)],
        ):
            subprocess.run(command, cwd=PROJECT, env=env, check=True, timeout=300)
        server, url = _start_server(env, Path(tmp))
        try:
            yield url
        finally:
            _stop(server)


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    _ensure_chromium()
    with tempfile.TemporaryDirectory(prefix="bookshop-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-quic",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--window-size=1280,900",
        ):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.set_page_load_timeout(60)
        driver.set_script_timeout(30)
        try:
            yield driver
        finally:
            driver.quit()


def _screenshot(driver: webdriver.Chrome, path: Path) -> None:
    """The page down to the end of the timeline, taller than the window if need be."""
    bottom = driver.execute_script(
        "const r = document.getElementById('timeline').getBoundingClientRect();"
        "return r.bottom + window.scrollY + 8;"
    )
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": 1280, "height": bottom, "scale": 1},
        },
    )
    path.write_bytes(base64.b64decode(shot["data"]))


def test_each_page_draws_one_bar_per_query(
    demo_server: str, browser: webdriver.Chrome
) -> None:
    output = Path(settings.OUTPUT_DIR)
    # A first round warms the server up (templates, connections, worker threads), so
    # that the screenshots show the pages as a user who clicks around sees them.
    for page in PAGES:
        browser.get(f"{demo_server}/{page}/")
    totals = {}
    for page in PAGES:
        browser.get(f"{demo_server}/{page}/")
        timeline = WebDriverWait(browser, 30).until(
            expected_conditions.visibility_of_element_located((By.ID, "timeline"))
        )
        bars = timeline.find_elements(By.CSS_SELECTOR, ".tl-bar")
        assert len(bars) == QUERIES, page
        # Drawn, not just present: each bar has a box on the screen.
        assert all(bar.size["width"] >= 1 and bar.size["height"] >= 1 for bar in bars)
        threads = {bar.get_attribute("data-thread") for bar in bars}
        if page == "sync":
            assert len(threads) == 1
        else:
            assert all(thread.startswith("asynchrormous-") for thread in threads)
        totals[page] = float(timeline.get_attribute("data-total-ms"))
        _screenshot(browser, output / f"dashboard-{page}.png")
    # The last page compares all three.
    rows = browser.find_elements(By.CSS_SELECTOR, ".cmp-row")
    assert len(rows) == len(PAGES)
    assert all(
        (output / f"dashboard-{page}.png").stat().st_size > 10_000 for page in PAGES
    )
    print("page totals (ms):", totals)
