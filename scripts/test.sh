#!/usr/bin/env bash
# The whole test suite, from a fresh machine: set-up, lint, the smoke boot,
# then pytest (unit tests, native C tests, and the VM tests, which boot real
# guests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/libvirtd.sh     # the libvirt placement's tests need a daemon on qemu:///system
.venv/bin/ruff check harness tests
.venv/bin/harness smoke      # the CI smoke boot: three VMs, a page, an MPK fault, SQL
exec .venv/bin/python -m pytest "$@"
