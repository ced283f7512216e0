"""The demo page in a real browser: ``python demo/app.py`` as a subprocess on 127.0.0.1 (tiny test models, rendered
at 32 px so the sandbox judge scores them), driven by Playwright with Debian's headless Chromium.

Needs ``/usr/bin/chromium`` (``apt-get install chromium``) and the ``demo`` extra (``pip install -e ".[demo]"``:
gradio + playwright). Never run ``playwright install``: the system Chromium is used.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REPO = Path(__file__).resolve().parents[1]
PROMPT = "a large red circle on the left on a white background"

if not CHROMIUM.is_file():
    pytest.skip(
        f"{CHROMIUM} not found: install Debian's Chromium (apt-get install -y chromium) to run the browser test",
        allow_module_level=True,
    )
pytest.importorskip("gradio", reason='gradio is not installed (pip install -e ".[demo]")')
sync_api = pytest.importorskip(
    "playwright.sync_api", reason='playwright is not installed (pip install -e ".[demo]")'
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the demo exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the demo did not answer at {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on a free port, base = a tiny pipeline, aligned = a LoRA with nonzero ``lora_B``."""
    from test_demo_core import make_lora
    from tiny_models import build_tiny_sd

    root = tmp_path_factory.mktemp("demo_browser")
    base = build_tiny_sd(root / "base")
    lora = make_lora(base, root / "lora")
    port = _free_port()
    log = root / "app.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1"}
    cmd = [
        sys.executable,
        str(REPO / "demo" / "app.py"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--base",
        str(base),
        "--aligned",
        str(lora),
        "--allow-root",
        str(root),
        "--resolution",
        "32",
        "--device",
        "cpu",
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_for(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1280, "height": 1000})
        pg.set_default_timeout(120_000)
        pg.goto(server, wait_until="domcontentloaded")
        pg.locator("#generate").wait_for()
        yield pg
        browser.close()


def _set_number(page, selector: str, value: str) -> None:
    """Type ``value`` into a number box and make sure the page kept it.

    Gradio mounts a tab's components when the tab is first shown; a value typed while the tab is still mounting can be
    replaced by the component's default (a CI run generated 4 seeds after "2" was typed). So wait until the box is
    visible, type, and read the value back after the change has settled, retyping if the page dropped it.
    """
    box = page.locator(selector)
    box.wait_for(state="visible")
    for _ in range(5):
        box.fill(value)
        box.press("Enter")
        page.wait_for_timeout(300)
        if box.input_value() == value:
            return
    raise AssertionError(f"{selector} does not keep the value {value!r} (it shows {box.input_value()!r})")


def _show_tab(page, name: str, marker: str) -> None:
    """Click a tab and wait until ``marker`` (an element inside it) is visible."""
    page.get_by_role("tab", name=name).click()
    page.locator(marker).wait_for(state="visible")


def test_generate_shows_two_images_and_scores(page):
    assert page.locator("#prompt textarea").input_value() == PROMPT
    assert "aligned (lora)" in page.locator("#model-status").inner_text()
    _set_number(page, "#steps input[type=number]", "2")
    page.locator("#generate").click()
    base_img = page.locator("#base-image img")
    aligned_img = page.locator("#aligned-image img")
    base_img.wait_for()
    aligned_img.wait_for()
    # both images really loaded in the browser, enlarged 8x from 32 px
    for img in (base_img, aligned_img):
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())
        assert img.evaluate("img => img.naturalWidth") == 256
    page.locator("#aligned-scores", has_text="harmlessness").wait_for()
    for side in ("#base-scores", "#aligned-scores"):
        lines = page.locator(side).inner_text().split("\n")
        names = [line.split()[0] for line in lines]
        assert names == ["overall", "prompt_following", "aesthetic", "fidelity", "harmlessness"]
        for line in lines:
            assert 0.0 <= float(line.split()[1]) <= 1.0
    assert "seed 0" in page.locator("#note").inner_text()


def test_gallery_tally(page):
    _show_tab(page, "Gallery", "#generate-gallery")
    try:
        _set_number(page, "#num-seeds input[type=number]", "2")
        page.locator("#generate-gallery").click()
        tally = page.locator("#tally", has_text="win rate")
        tally.wait_for()
        assert "over 2 seed(s)" in tally.inner_text()
        page.locator("#aligned-gallery img").nth(1).wait_for()
        assert page.locator("#base-gallery img").count() == 2
    finally:  # the next test starts on the first tab even when this one fails
        _show_tab(page, "Side by side", "#generate")


def test_bad_input_shows_message(page):
    _show_tab(page, "Side by side", "#generate")
    page.locator("#seed input").fill("-5")
    page.locator("#generate").click()
    msg = page.get_by_text("seed must be between 0 and 4294967295, got -5")
    msg.wait_for()
    assert msg.is_visible()
    page.locator("#seed input").fill("0")
