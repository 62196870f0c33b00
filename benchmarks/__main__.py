"""``python -m benchmarks`` runs the benchmark harness (the same as ``python -m benchmarks.bench``)."""

import sys

from benchmarks.cli import main

sys.exit(main())
