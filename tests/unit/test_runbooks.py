import threading
import time

import pytest

from controller.decisions.runbook_outcomes import RunbookOutcome
from controller.errors import RunbookParamError
from controller.hosts.launcher import step_env, wait_step
from controller.hosts.local_runbook import RunbookProcess, resolve_program
from controller.settings import RunbookConfig
from tests.conftest import process_alive

RB = RunbookConfig(
    argv=["apt-get", "install", "-y", "{package}", "--version={package}"],
    timeout_seconds=10,
    params={"package": "^[a-z0-9][a-z0-9.+-]{0,40}$"},
)


def test_params_fill_whole_elements_only():
    argv = RB.argv_for("rb", {"package": "openssl"})
    # "--version={package}" is not a whole-element placeholder: it stays literal.
    assert argv == ["apt-get", "install", "-y", "openssl", "--version={package}"]


@pytest.mark.parametrize(
    "value",
    ["openssl; rm -rf /", "$(reboot)", "-o APT::Foo", "a b", "", "x" * 300, "evil\x00"],
)
def test_values_that_do_not_match_are_refused(value):
    with pytest.raises(RunbookParamError):
        RB.argv_for("rb", {"package": value})


def test_unknown_and_missing_params_are_named():
    with pytest.raises(RunbookParamError, match="'shell'"):
        RB.argv_for("rb", {"package": "x", "shell": "sh"})
    with pytest.raises(RunbookParamError, match="needs parameter 'package'"):
        RB.argv_for("rb", {})


def test_config_refuses_undeclared_and_unused_placeholders():
    with pytest.raises(ValueError, match="undeclared parameters: cmd"):
        RunbookConfig(argv=["x", "{cmd}"], timeout_seconds=1)
    with pytest.raises(ValueError, match="never used"):
        RunbookConfig(argv=["x"], timeout_seconds=1, params={"a": ".*"})
    with pytest.raises(ValueError, match="argv\\[0\\]"):
        RunbookConfig(argv=["{p}"], timeout_seconds=1, params={"p": ".*"})


def test_resolve_program():
    assert resolve_program(["sleep"]) is not None
    assert resolve_program(["/nonexistent/tool"]) is None
    assert resolve_program(["no-such-program-xyz"]) is None


def _run(argv, *, timeout=5.0, budget=None, abort=None, limit=65536, grace=0.5):
    env = step_env(job_id=1, host="h", uri="test:///default", step="apply")
    proc = RunbookProcess(argv, env=env, output_limit=limit)
    now = time.monotonic()
    return proc, wait_step(
        proc,
        timeout_at=now + timeout,
        budget_at=now + (budget if budget is not None else 999),
        abort=abort or threading.Event(),
        grace=grace,
    )


def test_output_is_captured_and_bounded():
    _, result = _run(["sh", "-c", "head -c 5000 /dev/zero | tr '\\0' a; echo err >&2"], limit=1024)
    assert result.outcome is RunbookOutcome.COMPLETED and result.exit_code == 0
    assert result.stdout.startswith("a" * 1024) and "3976 more bytes dropped" in result.stdout
    assert result.stderr.strip() == "err"


def test_nonzero_exit_is_a_failure():
    _, result = _run(["sh", "-c", "exit 3"])
    assert result.outcome is RunbookOutcome.FAILED and result.exit_code == 3


def test_budget_watchdog_kills_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    # The runbook starts a grandchild that ignores TERM: only the group KILL reaches it.
    script = f"sh -c 'trap \"\" TERM; echo $$ > {pidfile}; sleep 300' & sleep 300"
    started = time.monotonic()
    proc, result = _run(["sh", "-c", script], budget=1.0, timeout=10, grace=0.3)
    elapsed = time.monotonic() - started
    assert result.outcome is RunbookOutcome.BUDGET_EXCEEDED
    assert elapsed < 3.0, elapsed
    child = int(pidfile.read_text())
    time.sleep(0.2)
    assert not process_alive(child)
    assert not process_alive(proc.pgid)


def test_runbook_timeout_before_budget():
    _, result = _run(["sleep", "30"], timeout=0.5, budget=10)
    assert result.outcome is RunbookOutcome.TIMED_OUT


def test_abort_kills_promptly():
    abort = threading.Event()
    threading.Timer(0.3, abort.set).start()
    started = time.monotonic()
    _, result = _run(["sleep", "30"], abort=abort)
    assert result.outcome is RunbookOutcome.ABORTED
    assert time.monotonic() - started < 2.0


def test_environment_does_not_leak_service_secrets(monkeypatch):
    monkeypatch.setenv("MAINTCTL_DATABASE_URL", "postgresql://secret")
    _, result = _run(["env"])
    assert "secret" not in result.stdout and "PATH=" in result.stdout
