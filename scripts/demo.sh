#!/usr/bin/env bash
# The main job, from a fresh machine: set-up, then `harness demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/harness demo "$@"
