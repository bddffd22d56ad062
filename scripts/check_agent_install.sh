#!/usr/bin/env bash
# An edge device installs only the `agent` extra. Prove, in a fresh virtual environment, that
# (1) none of the server's or trainer's dependencies come along, and
# (2) the installed `edgeloop-agent` runs: it installs a signed model from a real server and serves.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d /tmp/edgeloop-agent-venv.XXXXXX)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
"$venv/bin/python" -m pip install -q ".[agent]"
installed=$("$venv/bin/python" -m pip list --format=freeze | cut -d= -f1 | tr 'A-Z_' 'a-z-')
for forbidden in torch torchvision fastapi starlette uvicorn sqlalchemy scikit-learn skl2onnx psycopg; do
  if grep -qx "$forbidden" <<<"$installed"; then
    echo "FAIL: the agent extra pulled in $forbidden" >&2
    exit 1
  fi
done
echo "agent extra installs $(wc -l <<<"$installed") packages, none of torch/fastapi/sqlalchemy/sklearn"
du -sh "$venv" | awk '{print "agent venv size: " $1}'
.venv/bin/python scripts/agent_smoke.py "$venv/bin/edgeloop-agent"
