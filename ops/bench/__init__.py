"""Benchmarks of pcq on one machine: ``python -m ops.bench throughput|inflight|limiter``."""
