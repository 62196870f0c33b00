#!/usr/bin/env bash
# Creates .venv with torch 2.13.0 (CPU) and dcp-cloud with its test extras (the framework
# integrations included), at the exact versions in constraints.txt (the set the tests run on).
# Idempotent: a second run changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first, pinned: an open range could pull a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test-integrations${EXTRAS:+,$EXTRAS}]"
# torchtitan without its own requirements (datasets, wandb, tensorboard would move fsspec back);
# what its checkpointing needs comes with the torchtitan extra above.
.venv/bin/python -m pip install --quiet --no-deps -c constraints.txt torchtitan
# Azurite, Azure's storage emulator, is an npm package: installed into the virtualenv, where the
# tests find it (.venv/bin/azurite-blob). Without Node.js the Azure tests are skipped, except in CI.
AZURITE_VERSION=3.37.0
if [ ! -x .venv/bin/azurite-blob ] || ! grep -q "\"version\": \"$AZURITE_VERSION\"" .venv/azurite/node_modules/azurite/package.json 2>/dev/null; then
  if command -v npm >/dev/null 2>&1; then
    npm install --prefix .venv/azurite --no-audit --no-fund --silent "azurite@$AZURITE_VERSION"
    ln -sf ../azurite/node_modules/.bin/azurite-blob .venv/bin/azurite-blob
  else
    echo "setup: npm not found; Azurite (Azure tests) not installed. Install Node.js 18+ and rerun." >&2
  fi
fi
