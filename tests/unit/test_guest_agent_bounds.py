"""A guest's agent is the guest's word: a file read from it stops at READ_LIMIT even when the
agent never says eof (the real qemu-ga always does: this agent stands for a hostile one, which a
guest's root can put on the channel). The file's handle is closed either way. Reading a real
file through the real agent is tested on the bed (tests/integration/test_guest_notices.py)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from controller.errors import HypervisorError
from controller.hosts import guest_agent


class FileAgent:
    """Answers guest-file-* for one file of `size` bytes, or an endless one (size None)."""

    def __init__(self, size: int | None) -> None:
        self.left = size
        self.reads = 0
        self.closed: list[int] = []

    def __call__(self, command: dict[str, Any], timeout: int) -> Any:
        what = command["execute"]
        if what == "guest-file-open":
            return 7
        if what == "guest-file-close":
            self.closed.append(command["arguments"]["handle"])
            return {}
        assert what == "guest-file-read"
        self.reads += 1
        count = command["arguments"]["count"]
        if self.left is not None:
            count = min(count, self.left)
            self.left -= count
        chunk = b"x" * count
        eof = self.left == 0
        return {"count": count, "buf-b64": base64.b64encode(chunk).decode(), "eof": eof}


def test_a_file_that_never_ends_is_refused_past_the_limit_and_its_handle_closed():
    agent = FileAgent(None)
    with pytest.raises(HypervisorError, match="larger than 1048576 bytes"):
        guest_agent.read_file(agent, "/run/endless", 5)
    assert agent.reads == guest_agent.READ_LIMIT // guest_agent.READ_CHUNK + 1  # 17
    assert agent.closed == [7]


def test_a_file_up_to_the_limit_is_read_whole():
    agent = FileAgent(guest_agent.READ_LIMIT)
    assert len(guest_agent.read_file(agent, "/run/whole", 5)) == guest_agent.READ_LIMIT
    assert agent.closed == [7]
