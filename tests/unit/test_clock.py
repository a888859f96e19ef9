"""Clock sync decisions against a small fake that implements the Hypervisor protocol.

The real agent is exercised in tests/integration/test_engine_qemu.py; these cover the branches a
healthy guest never takes (agent late after resume, agent without set-time, a clock that lags).
"""

from controller.decisions.guests import GuestInfo, GuestState
from controller.errors import AgentUnavailable, Unsupported
from controller.hosts.clock import (
    REFINE_ROUNDS,
    SyncMethod,
    SyncOutcome,
    set_guest_clock,
    verify_guest_clock,
)


class FakeHost:
    uri = "fake://"

    def __init__(self, *, agent_down_for=0, set_time_supported=True, lag_ns=0, readable=True):
        self.agent_down_for = agent_down_for
        self.set_time_supported = set_time_supported
        self.lag_ns = lag_ns
        self.readable = readable
        self.calls: list[str] = []
        self.offset_ns = 30 * 10**9  # the guest clock is 30 s behind after a pause

    def _agent(self, what):
        self.calls.append(what)
        if self.agent_down_for > 0:
            self.agent_down_for -= 1
            raise AgentUnavailable("agent not connected")

    def set_agent_timeout(self, uuid, seconds):
        self.calls.append(f"timeout={seconds}")

    def set_time(self, uuid, epoch_ns):
        self._agent("set_time")
        if not self.set_time_supported:
            raise Unsupported("this feature or command is not currently supported")
        import time

        self.offset_ns = time.time_ns() - epoch_ns + self.lag_ns

    def sync_time_from_rtc(self, uuid):
        self._agent("rtc")
        self.offset_ns = 400_000_000  # RTC resolution: up to a second off

    def guest_time_ns(self, uuid):
        self._agent("get_time")
        import time

        return time.time_ns() - self.offset_ns if self.readable else 0

    def guest(self, uuid):
        return GuestInfo(uuid, "g", GuestState.RUNNING, "unpaused")


def sync(hv, **kw):
    first = set_guest_clock(
        hv,
        "u",
        agent_timeout_seconds=2,
        retry_seconds=kw.pop("retry", 1.0),
        sleep=lambda s: None,
        **kw,
    )
    return verify_guest_clock(hv, "u", first)


def test_explicit_set_time_is_verified_within_milliseconds():
    hv = FakeHost()
    result = sync(hv)
    assert result.outcome is SyncOutcome.OK and result.method is SyncMethod.SET_TIME
    assert abs(result.skew_ms) < 5
    assert hv.calls[0] == "timeout=2"


def test_retries_while_the_agent_wakes_up():
    hv = FakeHost(agent_down_for=2)
    result = sync(hv)
    assert result.outcome is SyncOutcome.OK and result.attempts == 3


def test_gives_up_when_the_agent_stays_away():
    clock = iter(range(100))
    hv = FakeHost(agent_down_for=1000)
    first = set_guest_clock(
        hv,
        "u",
        agent_timeout_seconds=2,
        retry_seconds=3.0,
        monotonic=lambda: float(next(clock)),
        sleep=lambda s: None,
    )
    assert first.outcome is SyncOutcome.AGENT_UNAVAILABLE and first.method is SyncMethod.NONE
    assert 2 <= first.attempts <= 4
    assert verify_guest_clock(hv, "u", first) is first


def test_falls_back_to_rtc_only_where_set_time_is_unsupported():
    hv = FakeHost(set_time_supported=False)
    result = sync(hv)
    assert result.method is SyncMethod.RTC and result.outcome is SyncOutcome.OK
    assert -450 < result.skew_ms < -350  # the guest is behind


def test_a_lagging_set_is_refined_a_bounded_number_of_times():
    hv = FakeHost(lag_ns=5_000_000)  # every set lands 5 ms late
    result = sync(hv)
    assert hv.calls.count("set_time") == 1 + REFINE_ROUNDS
    assert result.outcome is SyncOutcome.OK and -7 < result.skew_ms < -4  # still late, but measured


def test_a_clock_that_stays_far_off_fails():
    hv = FakeHost(lag_ns=900_000_000)
    result = sync(hv)
    assert result.outcome is SyncOutcome.FAILED and "ms off" in result.error


def test_an_unreadable_clock_is_unsupported_not_ok():
    result = sync(FakeHost(readable=False))
    assert result.outcome is SyncOutcome.UNSUPPORTED and result.skew_ms is None
