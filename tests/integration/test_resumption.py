"""The resume loop against libvirt's test driver and against a daemon that is not there."""

from __future__ import annotations

import itertools
import statistics
import threading
import time

from controller.cycle.resumption import Resumer, SettleKind, resume_until_settled
from controller.hosts.libvirt_host import LibvirtHost
from tests.conftest import TEST_DOMAIN_XML, TEST_URI, start_test_domains

NOBODY = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"


def test_resumes_a_guest_we_paused_and_says_so(test_driver) -> None:
    (dom,) = start_test_domains(test_driver, ["td-r1"])
    dom.suspend()
    settled = resume_until_settled(LibvirtHost(TEST_URI), dom.UUIDString(), stop=threading.Event())
    assert settled is not None and settled.kind is SettleKind.RUNNING
    assert settled.we_resumed and settled.attempts == 1
    assert dom.state()[0] == 1  # running


def test_a_running_guest_is_settled_without_claiming_the_resume(test_driver) -> None:
    (dom,) = start_test_domains(test_driver, ["td-r2"])
    settled = resume_until_settled(LibvirtHost(TEST_URI), dom.UUIDString(), stop=threading.Event())
    assert settled is not None and settled.kind is SettleKind.RUNNING
    assert not settled.we_resumed


def test_shut_off_is_left_alone_and_gone_is_gone(test_driver) -> None:
    dom = test_driver.defineXML(TEST_DOMAIN_XML.format(name="td-r3"))  # defined, shut off
    hv = LibvirtHost(TEST_URI)
    settled = resume_until_settled(hv, dom.UUIDString(), stop=threading.Event())
    assert settled is not None and settled.kind is SettleKind.LEFT_ALONE
    assert "shutoff" in settled.note
    uuid = dom.UUIDString()
    dom.undefine()
    settled = resume_until_settled(hv, uuid, stop=threading.Event())
    assert settled is not None and settled.kind is SettleKind.GONE


def test_an_unreachable_daemon_is_never_an_answer() -> None:
    """Connection refused for as long as it lasts: retried with capped backoff until stopped."""
    failures: list[tuple[float, str]] = []
    stop = threading.Event()
    hv = LibvirtHost(NOBODY, call_timeout=1.0)
    box: list[object] = []
    worker = threading.Thread(
        target=lambda: box.append(
            resume_until_settled(
                hv,
                "00000000-0000-0000-0000-000000000001",
                stop=stop,
                on_failure=lambda e: failures.append((time.monotonic(), e)),
                first_delay=0.01,
                max_delay=0.1,
            )
        )
    )
    worker.start()
    time.sleep(1.5)
    stop.set()
    worker.join(timeout=5)
    assert box == [None]  # stopped, never settled
    assert len(failures) >= 10
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(failures)]
    # The cap holds: it keeps knocking (the median; one gap may wait for a busy CPU).
    assert statistics.median(gaps) < 0.3 and max(gaps) < 1.5, gaps
    assert all("no connection" in e or "connect" in e.lower() for _, e in failures), failures[0]


def test_the_resumer_holds_one_task_per_guest(test_driver) -> None:
    (dom,) = start_test_domains(test_driver, ["td-r4"])
    dom.suspend()
    resumer = Resumer()
    hv = LibvirtHost(TEST_URI)
    seen: list[str] = []
    gate = threading.Event()

    def then(task):
        gate.wait(5)
        seen.append(task.name)

    first = resumer.resume(hv, dom.UUIDString(), "td-r4", then=then)
    again = resumer.resume(hv, dom.UUIDString(), "td-r4", then=then)
    assert again is first and resumer.holds(TEST_URI, dom.UUIDString())
    gate.set()
    assert first.finished.wait(5)
    assert seen == ["td-r4"] and not resumer.holds(TEST_URI, dom.UUIDString())
    assert resumer.close(wait=1) == []
