"""The dashboard in a real browser: Debian's chromium driven by Playwright, against the real service
and the real QEMU guests. The page must change live, without a reload, while a job runs."""

from __future__ import annotations

import time

import pytest

from tests.conftest import QEMU_URI
from tests.e2e.service import REPO, Client, Service, host_block

pytestmark = pytest.mark.qemu

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = REPO / ".artifacts" / "dashboard.png"  # at the end
RUNNING_SCREENSHOT = REPO / ".artifacts" / "dashboard-running.png"  # while the job runs
TIMEOUT_MS = 60_000


@pytest.fixture
def service(tmp_path, bed_guests):
    hosts = host_block("local", QEMU_URI) + host_block(
        "sim", "test:///default", sync_clock=False, update_domain=1
    )
    svc = Service(tmp_path, hosts=hosts).start()
    yield svc
    svc.stop()


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def _events_shown(page) -> int:
    return page.locator("#events li").count()


def test_the_page_follows_a_job_live(service, bed_guests, browser):
    operator = Client(service, service.token("operator", "ci"))
    # A first job, so the chart has history and the page has a latest job to replace.
    first = operator.http.post("/api/v1/jobs", json={"hosts": ["local"], "runbook": "noop"})
    operator.wait(first.json()["id"], {"succeeded"})

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    assert page.goto(f"{service.url}/dashboard").status == 401  # the login form
    page.fill("#token", service.token("viewer", "wall"))
    page.click("button[type=submit]")
    page.wait_for_url(f"{service.url}/dashboard")
    cookie = next(c for c in page.context.cookies() if c["name"] == "maintctl_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
    page.wait_for_selector("#live.on")  # the event stream is open
    page.evaluate("window.__notReloaded = true")
    assert page.locator('#hosts tr[data-host="local"]').get_attribute("data-state") == "idle"
    assert page.locator("#no-jobs").is_visible()
    events_before = _events_shown(page)

    r = operator.http.post(
        "/api/v1/jobs",
        json={"hosts": ["local", "sim"], "runbook": "sleep", "params": {"seconds": "2"}},
    )
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    started = time.monotonic()

    # Running: in the job list with its progress bar, and its host in maintenance.
    page.wait_for_selector(f'#jobs .job[data-job-id="{job_id}"][data-state="running"]')
    page.wait_for_selector(f'#jobs .job[data-job-id="{job_id}"] .seg.is-running')
    page.wait_for_selector('#hosts tr[data-host="local"][data-state="in_maintenance"]')
    assert page.locator(f'#jobs .job[data-job-id="{job_id}"] .wave').count() == 2
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(RUNNING_SCREENSHOT), full_page=True)
    # Done: the latest job panel shows it succeeded, with each guest's measured pause.
    page.wait_for_selector(f'#latest[data-job-id="{job_id}"][data-state="succeeded"]')
    took = time.monotonic() - started
    job = operator.job(job_id)
    assert job["state"] == "succeeded"
    for guest in job["guests"]:
        if guest["pause_ms"] is None:
            continue
        row = page.locator(f'#latest tr[data-guest="{guest["guest"]}"]')
        assert float(row.get_attribute("data-pause-ms")) == pytest.approx(
            guest["pause_ms"], abs=0.1
        )
        assert f"{guest['pause_ms']:.1f} ms" in row.inner_text()
    paused = {g["guest"] for g in job["guests"] if g["pause_ms"] is not None}
    assert {g.name for g in bed_guests} <= paused
    page.wait_for_selector("#no-jobs")
    assert page.locator('#hosts tr[data-host="local"]').get_attribute("data-state") == "idle"

    # The event list grew live by this job's events, newest first.
    job_events = operator.events(job_id)
    page.wait_for_function(
        "n => document.querySelectorAll('#events li').length >= n",
        arg=events_before + len(job_events),
    )
    newest = int(page.locator("#events li").first.get_attribute("data-event-id"))
    assert newest >= job_events[-1]["id"]
    assert page.locator("#chart circle.dot").count() >= len(paused) + 3
    assert page.evaluate("window.__notReloaded === true")  # all of it without a reload
    assert took < 60

    page.screenshot(path=str(SCREENSHOT), full_page=True)
    for shot in (RUNNING_SCREENSHOT, SCREENSHOT):
        data = shot.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000, (shot, len(data))
