"""The job's rules both edges use: its life cycle (claim, settle, store, sweep; the worker, and
the API's unsent-marking) and the domain's errors."""
