#!/usr/bin/env bash
# Set up everything, then run the closed-loop demo on a simulated fleet.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m firmware_sim.demo "$@"
