"""What a host reports of a guest, as plain values: the input of every decision about guests."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class GuestState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"
    OTHER = "other"


@dataclass(frozen=True)
class GuestInfo:
    uuid: str
    name: str
    state: GuestState
    # libvirt's reason for the state, e.g. "user" or "ioerror" for paused.
    reason: str
    # The type of an active libvirt job (backup, migration, ...), or None.
    active_job: str | None = None
    opted_out: bool = False
    availability_set: str | None = None
    # Its QEMU or agent does not answer (an operation on it is stuck, or it could not be
    # inspected in time): it is left exactly as it is, and it delays nothing else.
    unresponsive: bool = False
    memory_kib: int = 0  # its memory, as libvirt reports it (0: not known)


@dataclass(frozen=True)
class QemuProcess:
    """The QEMU process running a guest, as read on its host (/proc)."""

    pid: int | None  # None: no such process found
    deleted: tuple[str, ...] = ()  # the deleted executable and shared objects it still maps

    @property
    def stale(self) -> bool | None:
        """It runs a deleted binary or library: an update does not reach it until it restarts."""
        return None if self.pid is None else bool(self.deleted)
