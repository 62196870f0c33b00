"""``python -m benchmarks.bench``: the benchmark's command line (see ``benchmarks.cli``).

Also the module every measurement's worker process runs (``--worker``). ``python -m benchmarks``
and ``dcp-cloud bench`` run the same.
"""

from __future__ import annotations

import sys

from benchmarks.catalog import CONTENDERS
from benchmarks.cli import main, parse_args

__all__ = ["CONTENDERS", "main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
