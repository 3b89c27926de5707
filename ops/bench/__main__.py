"""``python -m ops.bench MODE``: see ops/bench/run.py and docs/benchmarks.md."""

import sys

from ops.bench.run import _exit_on_sigterm, main

_exit_on_sigterm()
sys.exit(main())
