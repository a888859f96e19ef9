"""The shipped unit gives the service and its listener child open files with headroom over the
listener's own cap (the unit once set none: about a thousand idle connections from guests would
have taken the whole service down)."""

from __future__ import annotations

import re
from pathlib import Path

from cli.metadata_listener import FD_RESERVE
from controller.settings import MetadataSettings

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "maintctl.service"


def test_limit_nofile_leaves_headroom_over_the_listeners_cap():
    found = re.search(r"^LimitNOFILE=(\d+)$", UNIT.read_text(), re.M)
    assert found, "deploy/maintctl.service sets no LimitNOFILE"
    limit = int(found.group(1))
    cap = MetadataSettings().max_connections
    assert limit >= 8 * (cap + FD_RESERVE), (limit, cap)
