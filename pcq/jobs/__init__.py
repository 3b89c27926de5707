"""The job lifecycle shared by the API (create, read) and the worker (claim, store)."""
