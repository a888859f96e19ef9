"""Host-facing adapters: libvirt, the guardian, runbook execution, clock sync, deadlines, pings."""
