#!/usr/bin/env bash
# Sets up, then runs the whole test suite (slow cases included) against local servers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Two pytest-xdist workers: much of the suite waits on servers and child processes. Modules with
# module-scoped fixtures stay on one worker (xdist_group). Later options win: -n 4, -n 0, ...
exec .venv/bin/python -m pytest -q -n 2 --dist loadgroup "$@"
