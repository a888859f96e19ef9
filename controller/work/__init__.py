"""Ownership of running work: lifecycle of jobs and work items, leases, leader, runners, timers."""
