"""Who owns running work: ownership rules, items and their leases, the job state machine, the
lease keeper, the leader, holds, and the Scheduled Events documents of the items."""
