"""The gallery page in a real browser: Debian's Chromium driven by Playwright, against a real root.

One module, one browser, one site: the local backend, the daemon as a process with the demo's jobs
(and a video, an audio, a text, a download and a failed job), and ``materializer gallery`` as a
process. Each test opens its own browser context; every request any page makes is recorded, and
each test ends by checking that none left the gallery's origin and no script error happened.

Chromium is the system's (``apt-get install chromium``, as ``.ci/run`` does); Playwright only drives
it (``playwright install`` is never run, nothing is downloaded).

The README's screenshot comes from :func:`test_screenshot_of_the_demo`: set ``GALLERY_SCREENSHOT``
to a path to keep it (``GALLERY_SCREENSHOT=docs/gallery.png pytest -n 0 tests/test_gallery_browser.py``).
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from playwright.sync_api import Browser, Dialog, Page, sync_playwright
from test_media_files import iso_file, wav_file
from test_output_kinds import ZIP, serve

from materializer.daemon import AUTH_ACTION
from materializer.demo import submit_demo_jobs
from materializer.layout import default_layout
from materializer.ledger import Ledger
from stella_devbackend import forkserver
from stella_devbackend.control import DevBackend
from stella_devbackend.harness import clean_env

from helpers import DaemonProcess, ledger_events, ledger_jobs, wait_until

#: Debian's Chromium (package ``chromium``); Playwright launches it instead of a browser of its own.
CHROMIUM = "/usr/bin/chromium"
XSS = "<img src=x onerror=alert(1)>"
CAPTION = "Rain on tin roofs,\nthe harbour hums."
#: The README's screenshot stays small.
SCREENSHOT_BYTES = 150_000


@dataclass
class Site:
    url: str
    origin: str
    root: Path
    backend: DevBackend
    daemon: DaemonProcess
    demo: list[str]
    extras: dict[str, str]
    submitted: list[str] = field(default_factory=list)

    def wait_materialized(self, job_ids: list[str]) -> None:
        wait_until(lambda: all(ledger_jobs(self.root).get(j) == "materialized" for j in job_ids), 60.0,
                   what="the jobs to be materialized")


@pytest.fixture(scope="module")
def site(_module_backend: DevBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    backend = _module_backend
    root = tmp_path_factory.mktemp("gallery") / "root"
    extras = {
        "video": backend.create_jobs(capability="text_to_video", prompt="a slow pan over a harbour", doc={
            "output": {"video": {"url": serve(backend, "clip", iso_file(b"isom", b"mp41"))}},
            "request": {"prompt": "a slow pan over a harbour"}})[0],
        "audio": backend.create_jobs(capability="text_to_speech", prompt="read it aloud", doc={
            "output": {"audio_file": {"url": serve(backend, "speech", wav_file())}},
            "request": {"prompt": "read it aloud"}})[0],
        "text": backend.create_jobs(capability="caption", prompt="a haiku", doc={
            "output": {"text": CAPTION}, "request": {"prompt": "a haiku"}})[0],
        "download": backend.create_jobs(capability="export", prompt="bundle it", doc={
            "output": {"result": {"url": serve(backend, "bundle", ZIP), "content_type": "application/zip"}},
            "request": {"prompt": "bundle it"}})[0],
        "failed": backend.create_jobs(status="failed", prompt="something forbidden",
                                      message="The provider refused the prompt.")[0],
    }
    with DaemonProcess(root, backend) as daemon:
        # The failure is noted before the demo's jobs land: it is older, below them on the page.
        wait_until(lambda: (root / "state").exists() and failed_noted(root), what="the failed job noted")
        # In a thread of its own: the browser's driver may hold this thread's event loop already.
        with ThreadPoolExecutor(1) as thread:
            demo = thread.submit(asyncio.run, submit_demo_jobs(backend, realtime_frames=2, pace=0.0)).result()
        site = Site("", "", root, backend, daemon, demo, extras)
        site.wait_materialized([*demo, *(job for kind, job in extras.items() if kind != "failed")])
        command = [sys.executable, "-m", "materializer", "gallery", "--root", str(root), "--port", "0"]
        with forkserver.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL, env=clean_env()) as gallery:
            try:
                assert gallery.stdout is not None
                line = gallery.stdout.readline()
                found = re.search(r"(http://127\.0\.0\.1:\d+)/[A-Za-z0-9_-]+/$", line.strip())
                assert found, f"no URL in {line!r}"
                site.url, site.origin = found.group(0), found.group(1)
                yield site
            finally:
                gallery.send_signal(signal.SIGTERM)
                gallery.communicate(timeout=30)
        assert gallery.returncode == 0


def failed_noted(root: Path) -> bool:
    return any(event.type == "media.failed" for event in ledger_events(root))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: apt-get install chromium (as .ci/run does)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM)
        yield launched
        launched.close()


@dataclass
class Recorder:
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def page(site: Site, browser: Browser, recorder: Recorder) -> Iterator[Page]:
    """A fresh context's page; afterwards, no request left the origin and no script failed."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.on("request", lambda request: recorder.requests.append(request.url))
    opened = context.new_page()
    opened.on("pageerror", lambda error: recorder.errors.append(str(error)))

    def dismiss(dialog: Dialog) -> None:
        recorder.dialogs.append(dialog.message)
        dialog.dismiss()

    opened.on("dialog", dismiss)
    yield opened
    context.close()
    outside = [url for url in recorder.requests if not url.startswith(site.origin + "/")]
    assert outside == [], f"requests outside {site.origin}: {outside}"
    assert recorder.errors == [] and recorder.dialogs == []


def open_gallery(page: Page, site: Site) -> None:
    page.goto(site.url)
    page.wait_for_selector(f'article.job[data-job-id="{site.demo[-1]}"]')


def card(page: Page, job_id: str) -> Any:
    return page.locator(f'article.job[data-job-id="{job_id}"]')


# -- the tests, in the order a person meets the page ---------------------------------------------------------------


def test_screenshot_of_the_demo(page: Page, site: Site, tmp_path: Path) -> None:
    page.set_viewport_size({"width": 1200, "height": 760})
    open_gallery(page, site)
    page.wait_for_function("() => [...document.querySelectorAll('img.thumb-img')]"
                           ".filter(i => i.getBoundingClientRect().top < innerHeight)"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    shot = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    # 256 colours, dithered (the gradients stay smooth): a small PNG for the README.
    palette = shot.quantize(256, method=Image.Quantize.MEDIANCUT)
    small = io.BytesIO()
    shot.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG).save(small, "PNG", optimize=True)
    assert len(small.getvalue()) < SCREENSHOT_BYTES
    with Image.open(io.BytesIO(small.getvalue())) as image:
        assert image.size == (1200, 760)
    target = os.environ.get("GALLERY_SCREENSHOT")
    if target:
        Path(target).write_bytes(small.getvalue())


def test_the_page_lists_the_demo_jobs_newest_first_with_thumbnails_that_decode(page: Page, site: Site) -> None:
    page.set_viewport_size({"width": 1280, "height": 8000})  # every tile in view: lazy images load
    open_gallery(page, site)
    listed = page.eval_on_selector_all("article.job", "cards => cards.map(c => c.dataset.jobId)")
    assert set(site.demo) <= set(listed)
    sort = page.eval_on_selector_all("#timeline > article", "cards => cards.map(c => Number(c.dataset.sort))")
    assert sort == sorted(sort, reverse=True)
    group = card(page, site.demo[0])  # the four lighthouses, one card
    assert group.locator(".images.group .tile").count() == 4
    assert group.locator("h2.prompt").text_content() == "a lighthouse at dusk, oil painting"
    assert "text to image" in group.locator(".meta").inner_text() and "best" in group.locator(".meta").inner_text()
    assert "1024\u00d71024" in group.locator("figcaption").first.inner_text()
    page.wait_for_function("() => [...document.querySelectorAll('img.thumb-img')].every(i => i.complete)")
    images = page.eval_on_selector_all(
        "article.job img.thumb-img",
        "imgs => imgs.map(i => ({job: i.closest('article').dataset.jobId, src: i.getAttribute('src'),"
        " w: i.naturalWidth, h: i.naturalHeight}))")
    demo_images = [image for image in images if image["job"] in site.demo]
    assert len(demo_images) == 4 + 1 + 1 + 1 + 2
    for image in demo_images:
        assert image["src"].startswith("thumbs/") and image["src"].endswith(".webp"), image
        assert max(image["w"], image["h"]) == 256, image  # decoded: the demo's images are 432 px or more
    boat = next(image for image in demo_images if image["job"] == site.demo[1])
    assert (boat["w"], boat["h"]) == (256, 144)  # 16:9 kept


def test_a_job_submitted_after_the_page_loaded_appears_without_a_reload(page: Page, site: Site) -> None:
    open_gallery(page, site)
    navigations: list[str] = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url))
    page.evaluate("() => { window.stillTheSamePage = true; }")
    answer = site.backend.generate({"capability": "text_to_image", "profile": "fast", "prompt": "a new arrival"})
    job_id = answer.json()["jobId"]
    site.submitted.append(job_id)
    page.wait_for_selector(f'article.job[data-job-id="{job_id}"] img.thumb-img', timeout=30_000)
    assert page.evaluate("() => window.stillTheSamePage") is True and navigations == []
    first = page.eval_on_selector("#timeline > article", "c => c.dataset.jobId")
    assert first == job_id
    assert "new" in (card(page, job_id).get_attribute("class") or "")
    assert card(page, job_id).locator("h2.prompt").text_content() == "a new arrival"


def test_a_thumbnail_opens_the_full_image_arrows_move_and_escape_closes(page: Page, site: Site) -> None:
    open_gallery(page, site)
    viewer = page.locator("#viewer")
    assert viewer.is_hidden()
    tiles = card(page, site.demo[0]).locator("button.thumb")
    tiles.nth(0).click()
    assert viewer.is_visible()
    full = page.locator("#viewer-image")
    page.wait_for_function("() => document.getElementById('viewer-image').naturalWidth > 0")
    assert full.get_attribute("src") == f"files/{site.demo[0]}_0.png"
    assert page.evaluate("() => document.getElementById('viewer-image').naturalWidth") == 1024  # the file itself
    page.keyboard.press("ArrowRight")
    assert full.get_attribute("src") == f"files/{site.demo[0]}_1.png"
    page.keyboard.press("ArrowLeft")
    assert full.get_attribute("src") == f"files/{site.demo[0]}_0.png"
    page.keyboard.press("Escape")
    assert viewer.is_hidden()
    assert page.evaluate("() => document.activeElement.classList.contains('thumb')")  # focus back on the tile


def test_video_and_audio_play_in_the_page_text_is_text_and_failures_are_notices(page: Page, site: Site) -> None:
    open_gallery(page, site)
    video = card(page, site.extras["video"]).locator("video")
    assert video.get_attribute("src") == f"files/{site.extras['video']}_0.mp4"
    assert video.get_attribute("controls") is not None
    audio = card(page, site.extras["audio"]).locator("audio")
    audio.scroll_into_view_if_needed()
    page.wait_for_function("a => a.readyState >= 1 && a.duration > 0", arg=audio.element_handle())  # playable
    text = card(page, site.extras["text"]).locator("pre.text")
    page.wait_for_function("p => !p.textContent.startsWith('Loading')", arg=text.element_handle())
    assert text.text_content() == CAPTION
    link = card(page, site.extras["download"]).locator("a.download")
    assert link.get_attribute("href") == f"files/{site.extras['download']}_0.bin"
    assert link.get_attribute("download") == f"{site.extras['download']}_0.bin"
    assert link.text_content() == "Download BIN file"
    notice = page.locator(f'article.failed[data-failed-id="{site.extras["failed"]}"]')
    assert notice.locator("h2").text_content() == "Image generation failed"
    assert notice.locator(".detail").text_content() == "The provider refused the prompt."


def test_a_prompt_with_markup_is_shown_as_text(page: Page, site: Site) -> None:
    answer = site.backend.generate({"capability": "text_to_image", "profile": "fast", "prompt": XSS})
    job_id = answer.json()["jobId"]
    site.wait_materialized([job_id])
    open_gallery(page, site)
    page.wait_for_selector(f'article.job[data-job-id="{job_id}"]')
    assert card(page, job_id).locator("h2.prompt").text_content() == XSS
    assert page.locator('img[src="x"]').count() == 0
    assert page.evaluate("() => document.body.innerHTML.includes('<img src=x')") is False  # escaped in the DOM
    # the page fixture checks that no dialog (alert) opened and no script error happened


def test_a_request_without_the_secret_gets_403(page: Page, site: Site) -> None:
    for path in ("/", "/api/snapshot", f"/files/{site.demo[0]}_0.png", "/not-the-secret/"):
        response = page.goto(site.origin + path)
        assert response is not None and response.status == 403, path
        assert "secret" in page.inner_text("body")
    response = page.goto(site.url + f"files/{site.demo[0]}_0.png")
    assert response is not None and response.status == 200


def test_the_page_makes_no_request_outside_its_origin(page: Page, site: Site, recorder: Recorder) -> None:
    page.set_viewport_size({"width": 1280, "height": 8000})
    open_gallery(page, site)
    page.wait_for_function("() => [...document.images].every(i => i.complete)")
    card(page, site.demo[0]).locator("button.thumb").first.click()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("Escape")
    kinds = {url.removeprefix(site.url).split("/")[0].split("?")[0] for url in recorder.requests}
    assert {"", "gallery.js", "gallery.css", "favicon.svg", "api", "thumbs", "files"} <= kinds
    assert len(recorder.requests) > 20
    # the page fixture asserts that every one of them was to the gallery's own origin


def test_quarantined_jobs_and_gaps_appear_as_notices_live(page: Page, site: Site) -> None:
    open_gallery(page, site)
    # A job whose image the daemon must refuse (not http): quarantined at once, with its reason.
    [job_id] = site.backend.create_jobs(prompt="never fetched", doc={
        "output": {"images": [{"url": "ftp://example.com/x.png"}]}, "request": {"prompt": "never fetched"}})
    notice = page.locator(f'li.notice.quarantined[data-job-id="{job_id}"]')
    notice.wait_for(timeout=30_000)
    assert notice.inner_text().startswith(f"Given up on job {job_id}: ")
    assert "ftp" in notice.inner_text()
    # A gap as the daemon reports one (the real backend's 200-job window, which this site cannot overflow
    # cheaply): written to the ledger's event log as the daemon writes it, shown with its time range.
    with Ledger(default_layout(site.root).ledger) as ledger:
        ledger.append_event("materializer.state", {"state": "gap", "fromMs": 1_700_000_000_000,
                                                   "untilMs": 1_700_000_600_000, "jobsAtLeast": 200,
                                                   "reason": "the backend has no gap-free page query"})
    gap = page.locator("li.notice.gap")
    gap.wait_for(timeout=30_000)
    text = gap.inner_text()
    assert "at least 200 jobs" in text and "the backend has no gap-free page query" in text
    expected = page.evaluate("() => [1700000000000, 1700000600000].map(ms => new Date(ms).toLocaleString("
                             "undefined, {dateStyle: 'medium', timeStyle: 'medium'}))")
    assert all(moment in text for moment in expected)


def test_a_refused_token_shows_the_action_text_in_the_banner_live(page: Page, site: Site) -> None:
    open_gallery(page, site)
    banner = page.locator("#banner")
    page.wait_for_function("() => document.getElementById('banner').dataset.state === 'connected'")
    live = site.backend.token
    forged = live[:-8] + ("A" * 8 if not live.endswith("A" * 8) else "B" * 8)  # live claims, a bad signature
    site.daemon.token_file.write_text(forged)
    try:
        page.wait_for_function("() => document.getElementById('banner').dataset.state === 'auth_required'",
                               timeout=30_000)
        assert banner.locator(".headline").text_content() == "Sign-in needed."
        assert banner.locator(".action").text_content() == AUTH_ACTION  # verbatim
    finally:
        site.daemon.token_file.write_text(live)
    page.wait_for_function("() => document.getElementById('banner').dataset.state === 'connected'", timeout=30_000)
    assert banner.locator(".action").count() == 0
