"""The cycle's support: runtime context, recorder and outbox, resumer, guest operations, recovery."""
