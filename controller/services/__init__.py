"""Services the API calls: jobs, idempotency, paging, event log reads, tokens, inventory."""
