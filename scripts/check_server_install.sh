#!/usr/bin/env bash
# A server installs only the `server` extra: training runs in workers (`edgeloop worker`, the
# `worker` extra) on other machines. Prove, in a fresh virtual environment, that
# (1) neither torch nor scikit-learn (nor the ONNX exporters) come along, and can be imported, and
# (2) the installed `edgeloop-server` serves the API on a real Mosquitto: it registers and signs a
#     model that a worker (this checkout's .venv) trained, and serves its artifact.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d /tmp/edgeloop-server-venv.XXXXXX)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
"$venv/bin/python" -m pip install -q ".[server]"
installed=$("$venv/bin/python" -m pip list --format=freeze | cut -d= -f1 | tr 'A-Z_' 'a-z-')
for forbidden in torch torchvision scikit-learn skl2onnx onnx; do
  if grep -qx "$forbidden" <<<"$installed"; then
    echo "FAIL: the server extra pulled in $forbidden" >&2
    exit 1
  fi
done
for module in torch sklearn; do
  if (cd /tmp && "$venv/bin/python" -c "import $module" 2>/dev/null); then
    echo "FAIL: $module is importable in the server-only install" >&2
    exit 1
  fi
done
echo "server extra installs $(wc -l <<<"$installed") packages; torch and sklearn are not importable"
du -sh "$venv" | awk '{print "server venv size: " $1}'
# The smoke script and its worker run this checkout's code (PYTHONPATH), whatever .venv points at.
PYTHONPATH=. .venv/bin/python scripts/server_smoke.py "$venv"
