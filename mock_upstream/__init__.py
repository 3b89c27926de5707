"""The mock upstream: a local stand-in for Parallel's chat endpoint, shipped with pcq for demos,
tests and load tests without credit. Run it with ``pcq mock-upstream`` (``pcq standalone`` starts
one when no ``PARALLEL_API_KEY`` is set). It imports nothing of pcq: it speaks only HTTP."""

from mock_upstream.server import COMPLETIONS_PATH, MODELS, MockConfig, create_app, parse_key_quotas, serve

__all__ = ["COMPLETIONS_PATH", "MODELS", "MockConfig", "create_app", "parse_key_quotas", "serve"]
