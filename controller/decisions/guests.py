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
