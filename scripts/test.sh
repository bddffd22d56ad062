#!/usr/bin/env bash
# Set up everything, then run the whole test suite and the agent-only and server-only install
# checks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${EDGELOOP_TEST_PG_URL:-}" ] && [ -f var/test-pg-url ]; then
  EDGELOOP_TEST_PG_URL=$(cat var/test-pg-url)
  export EDGELOOP_TEST_PG_URL
fi
echo "[test] agent-only install: a fresh venv with only the 'agent' extra runs the agent"
bash scripts/check_agent_install.sh
echo "[test] server-only install: a fresh venv with only the 'server' extra (no torch, no sklearn) serves"
bash scripts/check_server_install.sh
echo "[test] pytest"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
