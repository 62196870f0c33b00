#!/usr/bin/env bash
# Sets up, then runs the whole test suite (slow cases included) against local servers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
