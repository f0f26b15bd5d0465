"""The demo page of `gmlp serve`, in a real headless browser (Debian's Chromium, driven by Playwright): it loads with
nothing from elsewhere, takes an image, and shows the server's top class first; a screenshot is saved to look at."""

import io
import json
import os
import shutil
import signal
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_serve import start

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (Debian: apt-get install chromium; scripts/test.sh does)"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the dev extra)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
         "--disable-background-networking", "--disable-component-update"]  # fmt: skip


def test_the_demo_page_classifies_a_picked_image(tiny_run, tmp_path):
    photo = tmp_path / "photo.png"
    pixels = np.random.default_rng(3).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(photo)
    server, url = start(tiny_run)
    try:
        request = urllib.request.Request(
            url + "/predict", data=photo.read_bytes(), headers={"Content-Type": "image/png"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            expected = json.loads(response.read())["predictions"]
        seen = []
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 900, "height": 640})
            page.on("request", lambda r: seen.append(r.url))
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('about').textContent.includes('classes')", timeout=30000)
            assert "4 classes, 32 x 32 px input" in page.text_content("#about")
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("body[data-top]", timeout=30000)
            names = page.locator("#bars .row .name").all_text_contents()
            shot = tmp_path / "demo-page.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        assert names == [p["name"] for p in expected]  # the server's answer, most probable first
        assert all(u.startswith(url) or u.startswith("blob:") for u in seen), seen  # nothing from elsewhere
        image = Image.open(io.BytesIO(shot.read_bytes()))
        assert image.size[0] == 900 and len(set(image.convert("L").tobytes())) > 20  # drawn, not blank
        keep = os.environ.get("GMLP_SCREENSHOTS")
        if keep:  # for a person to look at: GMLP_SCREENSHOTS=folder
            shutil.copy(shot, Path(keep) / shot.name)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
