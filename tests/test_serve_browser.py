"""The page of ``dinodet serve`` in a real browser (Debian's chromium, driven by Playwright): a photo
uploaded through the file input gets its boxes drawn and a table equal to the API's answer, the
threshold slider works from the keyboard, nothing is loaded from elsewhere and the console stays
clean.  The screenshot is kept under the test's tmp dir (``DINODET_UPDATE_SCREENSHOT=1`` also
writes it to docs/serve_page.png for the README).  Skipped, with the reason, without chromium or
playwright."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

from conftest import COCO128_IMAGES, NO_CHROMIUM, REPO_ROOT  # noqa: E402

from dinodet.serve import BackgroundServer, ServeOptions  # noqa: E402

CHROMIUM = Path(os.environ.get("DINODET_CHROMIUM", "/usr/bin/chromium"))
PHOTO = COCO128_IMAGES / "000000000009.jpg"  # 640x480
OTHERS = ("000000000086.jpg", "000000000030.jpg")  # a greyscale one among them
THRESHOLD = 0.04  # the random tiny model scores below ~0.05
SCREENSHOT = REPO_ROOT / "docs" / "serve_page.png"

pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(),
                                reason=f"{NO_CHROMIUM} at {CHROMIUM} (apt-get install chromium)")


def test_page_uploads_draws_and_tables_the_api_answer(tiny_detector, tmp_path):
    with BackgroundServer(tiny_detector, ServeOptions(port=0)) as server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 1100})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            foreign: list[str] = []
            page.on("request", lambda r: None if r.url.startswith((server.url, "blob:", "data:")) else
                    foreign.append(r.url))
            page.goto(server.url + "/")
            # (expect, not wait_for_function: the page's CSP forbids the eval that the latter's polling uses)
            sync_api.expect(page.locator("#model-info")).to_contain_text("model: tiny")
            assert page.is_hidden("#key-row")  # no API key needed here

            # keyboard only: Tab reaches the file input and the slider; the slider moves with keys
            reached = []
            for _ in range(6):
                page.keyboard.press("Tab")
                reached.append(page.evaluate("document.activeElement.id"))
            assert "file-input" in reached and "threshold" in reached, reached
            page.focus("#threshold")
            page.keyboard.press("Home")
            for _ in range(round(THRESHOLD / 0.01)):
                page.keyboard.press("ArrowRight")
            assert page.input_value("#threshold") == str(THRESHOLD)
            assert page.text_content("#threshold-value") == f"{THRESHOLD:.2f}"

            page.set_input_files("#file-input", str(PHOTO))
            page.wait_for_selector("article.result[data-state='done']", timeout=60_000)
            rows = page.eval_on_selector_all(
                "article.result tbody tr",
                "rows => rows.map(r => [r.cells[1].textContent, Number(r.dataset.categoryId), Number(r.dataset.score),"
                " JSON.parse(r.dataset.bbox)])")
            answer = httpx.post(f"{server.url}/v1/detect?threshold={THRESHOLD}",
                                files={"image": PHOTO.read_bytes()}, timeout=60).json()
            expected = [[d["class_name"], d["category_id"], d["score"], d["bbox"]] for d in answer["detections"]]
            assert len(rows) == len(expected) > 0
            for got, want in zip(rows, expected):
                assert got[:2] == want[:2] and abs(got[2] - want[2]) < 1e-6
                assert max(abs(a - b) for a, b in zip(got[3], want[3])) < 1e-3
            # the boxes are drawn: the canvas holds the photo's size and differs from the bare photo
            size = page.eval_on_selector("article.result canvas", "c => [c.width, c.height]")
            assert size == [640, 480]
            drawn = page.eval_on_selector(
                "article.result canvas",
                "c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                " let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] > 220 && d[i+1] < 60 && d[i+2] < 90) n++;"
                " return n; }")
            assert drawn > 0  # box or label pixels in the palette's red (#e6194b) at least
            caption = page.text_content("article.result caption")
            assert caption.startswith(f"{len(expected)} detection(s) with score > {THRESHOLD:.2f}")
            assert "batch of" in page.text_content("article.result .timing")

            # the slider filters the shown answer without a new request: a step down, more rows
            page.focus("#threshold")
            page.keyboard.press("ArrowLeft")
            lower = float(page.input_value("#threshold"))
            assert lower == pytest.approx(THRESHOLD - 0.01)
            everything = httpx.post(f"{server.url}/v1/detect?threshold=0", files={"image": PHOTO.read_bytes()},
                                    timeout=60).json()["detections"]
            rows_lower = page.eval_on_selector_all("article.result tbody tr", "rows => rows.length")
            assert rows_lower == sum(d["score"] > lower for d in everything) > len(expected)
            page.keyboard.press("ArrowRight")
            assert page.eval_on_selector_all("article.result tbody tr", "rows => rows.length") == len(expected)


            shot = tmp_path / "serve_page.png"
            page.screenshot(path=str(shot), full_page=False)
            assert shot.stat().st_size > 10_000
            if os.environ.get("DINODET_UPDATE_SCREENSHOT") == "1":
                SCREENSHOT.parent.mkdir(exist_ok=True)
                shutil.copy(shot, SCREENSHOT)

            # several images at once: one result each
            page.set_input_files("#file-input", [str(COCO128_IMAGES / n) for n in OTHERS])
            sync_api.expect(page.locator("article.result[data-state='done']")).to_have_count(1 + len(OTHERS),
                                                                                         timeout=60_000)
            names = page.eval_on_selector_all("article.result h2", "hs => hs.map(h => h.textContent)")
            assert sorted(names) == sorted([PHOTO.name, *OTHERS])

            assert not problems, problems
            assert not foreign, foreign
        finally:
            browser.close()
