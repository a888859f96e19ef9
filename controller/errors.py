"""Domain errors. Each carries a message an operator can act on."""

from __future__ import annotations


class MaintctlError(Exception):
    """Base of every error maintctl raises on purpose."""


class ConfigError(MaintctlError):
    """The configuration cannot be used; the message names the key and the problem."""


class InvalidTransition(MaintctlError):
    def __init__(self, current: str, target: str) -> None:
        super().__init__(f"a job in state {current!r} cannot become {target!r}")
        self.current = current
        self.target = target


class NotFound(MaintctlError):
    """A named thing (host, job, runbook) does not exist."""


class Conflict(MaintctlError):
    """The request collides with the current state of things."""


class InvalidRequest(MaintctlError):
    """The request is well-formed but cannot be carried out as asked."""


class AdmissionRefused(InvalidRequest):
    """The runbook cannot fit inside the pause budget; nothing was paused."""


class RunbookParamError(InvalidRequest):
    """A runbook parameter is missing, unknown, or does not match its declared pattern."""


# What a caller who may not read libvirt's own words is told instead (docs/security.md): libvirt
# error text can quote a host's files, and only admins see it.
HOST_PROBLEM_CATEGORIES = ("unreachable", "refused", "timed out", "not found")


class HypervisorError(MaintctlError):
    """A libvirt call failed; code is libvirt's error code where there is one, category one of
    HOST_PROBLEM_CATEGORIES."""

    category = "unreachable"

    def __init__(
        self, message: str, *, code: int | None = None, category: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        if category is not None:
            self.category = category


class HostUnavailable(HypervisorError):
    """The host's libvirt daemon cannot be reached (or refused the connection: category)."""


class CallTimedOut(HypervisorError):
    """A libvirt call did not return in time; it was left to finish on its own thread.

    Its outcome is unknown: a suspend or resume may still take effect when it returns.
    """

    category = "timed out"


class GuestNotFound(HypervisorError):
    """No guest with that UUID on the host."""

    category = "not found"


class AgentUnavailable(HypervisorError):
    """The guest agent did not answer (not connected, not responding, or timed out)."""


class Unsupported(HypervisorError):
    """The driver or the guest agent does not support the operation."""


class DatabaseUnavailable(MaintctlError):
    """The database did not answer; what was being recorded waits in the outbox."""
