#!/usr/bin/env bash
# Sets up, then saves and loads a model on an embedded local S3 server (or --url s3://...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/quickstart.py "$@"
