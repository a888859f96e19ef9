"""One job's work: the rollout over its hosts (rollout.py) and one host's cycle (host_cycle.py),
each step a module of its own, recorded through recording.py and the outbox."""
