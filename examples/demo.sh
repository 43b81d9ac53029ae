#!/usr/bin/env bash
# One command on a fresh Debian machine (as root): install what shardfs needs, then run
# the demo (ingest a model, mount it, load it through the mount, verify it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install
exec .venv/bin/python examples/demo.py
