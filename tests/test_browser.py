"""The browser UI in a real Chromium (Debian's, headless, driven by Playwright).

Submits through the form, watches the preview change and the progress reach 100 %, plays
the final video, reloads mid-run, cancels a job and sees a field error.  Every wait is on
page state; screenshots are saved under the path printed at the start.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from stack import ROOT

from .conftest import noise_image

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
LONG = 120_000  # ms


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("FRAMEPACK_SKIP_BROWSER"):
            pytest.skip("FRAMEPACK_SKIP_BROWSER set and no Chromium")
        pytest.fail(f"{CHROMIUM} missing: `make test` installs Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def artifacts(request) -> Path:
    path = Path(os.environ.get("FRAMEPACK_ARTIFACTS", ROOT / "artifacts")) / "browser"
    path.mkdir(parents=True, exist_ok=True)
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print(f"\nbrowser screenshots: {path}")  # shown in the test log even when capturing
    return path


@pytest.fixture
def image_file(tmp_path) -> Path:
    path = tmp_path / "start.png"
    noise_image(120, 120, seed=5).save(path)
    return path


def _open(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")


def _fill_job(page, image: Path, seconds: str, steps: str, resolution: str = "128") -> None:
    page.set_input_files("#image", str(image))
    page.fill("#f-prompt", "a glowing orb drifts")
    page.fill("#f-total_second_length", seconds)
    if not page.is_visible("#f-steps"):
        page.click("#advanced summary")
    page.fill("#f-steps", steps)
    page.fill("#f-resolution", resolution)


def test_field_error_is_shown_next_to_the_field(live, browser, image_file, artifacts):
    from playwright.sync_api import expect

    page = browser.new_page()
    _open(page, live.base + "/")
    expect(page.locator("#profile-badge")).to_contain_text("tiny")
    expect(page.locator("#noise-warning")).to_be_visible()
    _fill_job(page, image_file, "2", "500")
    page.click("#submit-btn")
    expect(page.locator("#error-steps")).to_contain_text("100")
    expect(page.locator("#f-steps")).to_have_attribute("aria-invalid", "true")
    assert page.url.rstrip("/") == live.base  # nothing submitted
    # the end image is only offered for the original model
    expect(page.locator("#end-image-field")).to_be_visible()
    page.select_option("#f-model", "framepack-f1")
    expect(page.locator("#end-image-field")).to_be_hidden()
    page.screenshot(path=artifacts / "field-error.png", full_page=True)
    page.close()


def test_submit_watch_reload_and_play(live, browser, image_file, artifacts):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1100, "height": 1000})
    _open(page, live.base + "/")
    _fill_job(page, image_file, "2", "60")
    page.click("#submit-btn")
    page.wait_for_url(re.compile(r".*/jobs/[^/]+$"))
    job_url = page.url

    # the canvas counts the preview images it was given: the preview changed at least twice
    page.wait_for_function("Number(document.querySelector('#preview-canvas').dataset.previews || 0) >= 3",
                           timeout=LONG)  # fmt: skip
    page.screenshot(path=artifacts / "job-running.png", full_page=True)

    page.reload()  # mid-run: the page must pick the job up again from its URL
    page.wait_for_selector("body[data-ready=true]")
    assert page.url == job_url
    expect(page.locator("#job-state")).to_contain_text("running")
    page.wait_for_function("Number(document.querySelector('#preview-canvas').dataset.previews || 0) >= 1",
                           timeout=LONG)  # fmt: skip
    expect(page.locator("#preview-canvas")).to_be_visible()

    expect(page.locator("#final")).to_be_visible(timeout=LONG)
    expect(page.locator("#job-state")).to_contain_text("succeeded")
    expect(page.locator("#job-progress")).to_have_attribute("aria-valuenow", "100")
    can_play = page.evaluate(
        """() => document.querySelector('#final-video').canPlayType('video/mp4; codecs="avc1.64001E"')"""
    )
    assert can_play in ("probably", "maybe")
    duration = page.wait_for_function(
        """() => { const v = document.querySelector('#final-video');
                   return v.readyState >= 1 && v.duration > 0 ? v.duration : null; }""",
        timeout=LONG,
    ).json_value()
    assert duration == pytest.approx(73 / 30, abs=0.1)
    expect(page.locator("#job-meta")).to_contain_text("seed")
    expect(page.locator("#download-link")).to_have_attribute("href", re.compile(r"/api/jobs/.+/video"))
    page.screenshot(path=artifacts / "job-succeeded.png", full_page=True)

    # the queue lists it
    expect(page.locator(f"#queue li[data-job-id='{job_url.rsplit('/', 1)[1]}']")).to_be_visible()
    page.close()


def test_cancel_keeps_finished_sections(live, browser, image_file, artifacts):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 390, "height": 900})  # phone width
    _open(page, live.base + "/")
    _fill_job(page, image_file, "4", "60")
    page.click("#submit-btn")
    page.wait_for_url(re.compile(r".*/jobs/[^/]+$"))
    expect(page.locator("#sections-list li")).to_have_count(1, timeout=LONG)
    page.click("#cancel-btn")
    expect(page.locator("#job-state")).to_contain_text("cancelled", timeout=LONG)
    assert page.locator("#sections-list li").count() >= 1
    expect(page.locator("#partial-video")).to_be_visible()
    expect(page.locator("#final")).to_be_hidden()
    expect(page.locator("#cancel-btn")).to_be_hidden()
    page.screenshot(path=artifacts / "job-cancelled-phone.png", full_page=True)
    page.close()


def test_several_images_make_a_batch_with_a_lora_and_its_page_follows_it(live, browser, tmp_path, artifacts):
    from playwright.sync_api import expect

    from .test_lora import _pairs

    lora = live.root / "loras" / "ui-wiggle.safetensors"
    from safetensors.torch import save_file

    save_file({f"transformer.{n}.lora_{ab}.weight": t for n, (a, b) in _pairs(3).items()
               for ab, t in (("A", a), ("B", b))}, str(lora))  # fmt: skip
    images = []
    for i in range(2):
        images.append(tmp_path / f"in-{i}.png")
        noise_image(96, 96, seed=10 + i).save(images[-1])
    page = browser.new_page(viewport={"width": 1100, "height": 1000})
    try:
        _open(page, live.base + "/")
        page.set_input_files("#image", [str(p) for p in images])
        expect(page.locator("#image-hint")).to_contain_text("2 images")
        page.fill("#f-prompt", "idle [0s: a wave] [1.1s: a spin]")
        page.fill("#f-total_second_length", "2")
        page.click("#add-lora")
        page.select_option("#f-loras\\.0\\.name", "ui-wiggle")
        page.fill("#f-loras\\.0\\.weight", "0.6")
        if not page.is_visible("#f-steps"):
            page.click("#advanced summary")
        page.fill("#f-steps", "2")
        page.click("#submit-btn")
        page.wait_for_url(re.compile(r".*/batches/[^/]+$"))
        expect(page.locator("#batch-jobs li")).to_have_count(2)
        expect(page.locator("#batch-counts")).to_contain_text("2 succeeded", timeout=LONG)
        page.screenshot(path=artifacts / "batch.png", full_page=True)
        batch_id = page.url.rsplit("/", 1)[1]
        jobs = __import__("httpx").get(f"{live.base}/api/batches/{batch_id}").json()["jobs"]
        for job in jobs:
            params = live.job(job["id"])["params"]
            assert params["loras"] == [{"name": "ui-wiggle", "weight": 0.6}]
            assert params["prompt"] == "idle [0s: a wave] [1.1s: a spin]"
    finally:
        page.close()
        lora.unlink()


def test_a_token_is_asked_for_kept_for_the_session_and_used_everywhere(secured, browser, image_file, artifacts):
    from playwright.sync_api import expect

    from .conftest import ANN

    page = browser.new_page(viewport={"width": 1100, "height": 1000})
    page.goto(secured.base + "/")
    expect(page.locator("#token-view")).to_be_visible()
    page.screenshot(path=artifacts / "token-asked.png", full_page=True)
    page.fill("#token-input", "not-a-token")
    page.click("#token-btn")
    expect(page.locator("#token-error")).to_contain_text("refused")
    page.fill("#token-input", ANN)
    page.click("#token-btn")
    page.wait_for_selector("body[data-ready=true]")
    expect(page.locator("#who-name")).to_have_text("ann (user)")

    _fill_job(page, image_file, "2", "4")
    page.click("#submit-btn")  # fetch with the Bearer header
    page.wait_for_url(re.compile(r".*/jobs/[^/]+$"))
    job_id = page.url.rsplit("/", 1)[1]
    expect(page.locator("#final")).to_be_visible(timeout=LONG)  # the WebSocket, with an access ticket
    duration = page.wait_for_function(
        """() => { const v = document.querySelector('#final-video');
                   return v.readyState >= 1 && v.duration > 0 ? v.duration : null; }""",
        timeout=LONG,
    ).json_value()  # the <video src>, with an access ticket
    assert duration == pytest.approx(73 / 30, abs=0.1)
    thumb = page.locator(f"#queue li[data-job-id='{job_id}'] img")
    expect(thumb).to_be_visible(timeout=LONG)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumb.element_handle(), timeout=LONG)

    page.reload()  # the token is kept for the session: no second prompt
    page.wait_for_selector("body[data-ready=true]")
    expect(page.locator("#token-view")).to_be_hidden()
    expect(page.locator("#job-state")).to_contain_text("succeeded")
    page.screenshot(path=artifacts / "token-job.png", full_page=True)

    other = browser.new_page()  # another tab: its own session, so it asks again
    other.goto(secured.base + "/")
    expect(other.locator("#token-view")).to_be_visible()
    other.close()
    page.click("#sign-out")
    expect(page.locator("#token-view")).to_be_visible()
    page.close()


OVERFLOW = """() => { const w = document.documentElement.clientWidth;
    const wide = [...document.querySelectorAll('body *')].filter((e) => {
        const r = e.getBoundingClientRect(); return r.width > 0 && r.right > w + 1; });
    return {scroll: document.documentElement.scrollWidth, width: w,
            wide: wide.slice(0, 5).map((e) => e.tagName + '#' + e.id + '.' + e.className)}; }"""


def _fits(page, what: str) -> None:
    got = page.evaluate(OVERFLOW)
    assert got["scroll"] <= got["width"] and not got["wide"], (what, got)


@pytest.mark.parametrize("width", [390, 320])
def test_a_phone_sees_every_page_without_sideways_scrolling(live, browser, image_file, artifacts, width):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": width, "height": 800})
    long_prompt = "a glowing orb drifts " * 12 + "andaverylongwordwithoutanyspacesthatmustwrapsomewhere" * 2
    _open(page, live.base + "/")
    page.fill("#f-prompt", long_prompt + " [0s: it rises] [1s: it falls]")
    expect(page.locator("#prompt-schedule li")).to_have_count(2)  # the timestamps, resolved as typed
    page.set_input_files("#image", str(image_file))
    _fits(page, f"form at {width}")
    page.fill("#f-total_second_length", "2")
    if not page.is_visible("#f-steps"):
        page.click("#advanced summary")
    page.fill("#f-steps", "12")
    page.fill("#f-resolution", "128")
    _fits(page, f"form with the advanced fields at {width}")
    page.click("#submit-btn")
    page.wait_for_url(re.compile(r".*/jobs/[^/]+$"))
    expect(page.locator("#job-state")).to_contain_text("running", timeout=LONG)
    _fits(page, f"a running job at {width}")
    expect(page.locator("#job-state")).to_contain_text("succeeded", timeout=LONG)
    expect(page.locator("#preview-caption")).not_to_contain_text("Live preview")
    _fits(page, f"a finished job at {width}")
    expect(page.locator("#queue li").first).to_be_visible()
    _fits(page, f"the queue at {width}")
    page.screenshot(path=artifacts / f"phone-{width}.png", full_page=True)
    page.close()


def test_an_ended_jobs_page_says_why_and_an_unknown_one_offers_nothing(live, browser, artifacts):
    from playwright.sync_api import expect

    job = live.submit(total_second_length=4, steps=60)
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    _open(page, f"{live.base}/jobs/{job['id']}")
    expect(page.locator("#job-state")).to_contain_text("running", timeout=LONG)
    out = live.celery("control", "terminate", "SIGTERM", job["id"])
    assert out.returncode == 0, out.stderr
    expect(page.locator("#job-state")).to_contain_text("cancelled", timeout=LONG)
    expect(page.locator("#job-reason")).to_contain_text("terminated by operator")
    page.screenshot(path=artifacts / "job-terminated.png", full_page=True)
    _open(page, f"{live.base}/jobs/no-such-job")
    expect(page.locator("#job-error")).to_contain_text("Unknown job")
    expect(page.locator("#cancel-btn")).to_be_hidden()
    expect(page.locator("#job-preview")).to_be_hidden()
    page.close()


def test_the_history_pages_past_the_newest_50_and_filters_by_state(live, browser):
    from playwright.sync_api import expect

    r = live.redis()
    total = int(r.zcard("fp:jobs"))
    for _ in range(max(0, 53 - total)):  # queued jobs, cancelled at once: the history grows past 50
        live_job = live.submit()
        __import__("httpx").post(f"{live.base}/api/jobs/{live_job['id']}/cancel")
    total = int(r.zcard("fp:jobs"))
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    _open(page, live.base + "/")
    expect(page.locator("#queue li")).to_have_count(50, timeout=LONG)
    expect(page.locator("#queue-more")).to_be_visible()
    shown = 50
    while page.is_visible("#queue-more"):  # 50 older jobs a click
        page.click("#queue-more")
        shown = min(total, shown + 50)
        expect(page.locator("#queue li")).to_have_count(shown, timeout=LONG)
    assert shown == total
    page.select_option("#queue-filter", "cancelled")
    cancelled = page.locator("#queue li")
    assert cancelled.count() >= 3 and all(s == "cancelled" for s in cancelled.evaluate_all(
        "els => els.map((e) => e.dataset.state)"))  # fmt: skip
    page.close()
