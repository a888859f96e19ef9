"""Windows that carry a job template submit it once per opening, on the leader.

The Idempotency-Key is made of the window and the opening: whichever replica leads, and however
often it restarts, each opening submits one job, as an operator's submission would.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from controller.cycle.runtime import Runtime
from controller.decisions.windows import current_opening
from controller.errors import MaintctlError
from controller.services import jobs as job_service
from controller.store.db import unit_of_work
from controller.store.models import utcnow
from controller.work.holds import declared_windows, window_of

log = logging.getLogger(__name__)


class WindowJobs:
    def __init__(self, ctx: Runtime, *, arm: Callable[[int, datetime | None], None]) -> None:
        self.ctx = ctx
        self._arm = arm
        self._submitted: set[tuple[str, datetime]] = set()

    def submit_due(self) -> None:
        """Each window with a job template submits it once per opening (an Idempotency-Key made
        of the window and the opening: any replica, any restart, one job)."""
        now = utcnow()
        with unit_of_work(self.ctx.session_factory) as s:
            declared = declared_windows(s, self.ctx.settings)
        for config, _ in declared.values():
            if config.job is None:
                continue
            opening = current_opening(window_of(config), now=now)
            if opening is None or (config.name, opening.start) in self._submitted:
                continue
            req = job_service.JobRequest(
                hosts=list(config.hosts or []),
                all_hosts=config.selector == {},  # an empty selector covers every host
                labels=dict(config.selector) if config.selector else None,
                runbook=config.job.runbook,
                params=dict(config.job.params),
                pause_budget_seconds=config.job.pause_budget_seconds,
                notice_seconds=config.job.notice_seconds,
                window=config.name,
            )
            key = f"window:{config.name}:{opening.start.isoformat()}"
            try:
                with self.ctx.session_factory() as s:
                    submitted = job_service.submit_once(
                        s,
                        session_factory=self.ctx.session_factory,
                        settings=self.ctx.settings,
                        req=req,
                        actor=f"window:{config.name}"[:63],
                        idempotency_key=key,
                        payload={"window": config.name, "opening": opening.start.isoformat()},
                        now=now,
                    )
                    job_id = submitted.job.id
            except MaintctlError as exc:  # refused: not again until the next opening
                self._submitted.add((config.name, opening.start))
                log.warning("window %s opened but its job was refused: %s", config.name, exc)
                continue
            self._submitted.add((config.name, opening.start))
            if not submitted.replayed:
                self._arm(job_id, None)
