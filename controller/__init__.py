"""maintctl's controller: everything but HTTP (api/) and the command line (cli/).

- engine.py: the maintenance cycle of one job, host by host (pause -> patch -> resume -> sync).
- cycle/: what the cycle stands on while guests are paused: the runtime context, the recorder
  and its outbox, the resumer every path shares, the concurrent guest operations, recovery.
- work/: who owns running work: job and work-item lifecycle, leases, leader election, runner
  liveness, the scheduler's timers.
- hosts/: adapters to the host: libvirt (the only module importing it), the guardian process,
  runbook execution, guest clock sync, call deadlines, health pings.
- decisions/: pure functions of their inputs (state machine, verdicts, preflight, wave order).
- services/: what the API calls: job submission and reads, idempotency, paging, tokens, hosts.
- store/: tables, sessions and migrations helpers, the event log writer.
- settings.py, errors.py: shared by all of the above.
"""
