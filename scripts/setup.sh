#!/usr/bin/env bash
# Set up everything edgeloop needs on a fresh Debian/Ubuntu machine, idempotently:
#   system packages (Mosquitto, PostgreSQL, chromium for the browser test, docker-compose for the
#   compose-file check),
#   a running PostgreSQL with a `test` database, and the Python virtual environment in .venv.
# Safe to run again: each step checks first and does nothing when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

apt_packages=()
have mosquitto || apt_packages+=(mosquitto)
have docker-compose || apt_packages+=(docker-compose)
have pg_ctlcluster || apt_packages+=(postgresql)
# The dashboard's browser test drives Debian's chromium headless (no browser download).
[ -x /usr/bin/chromium ] || apt_packages+=(chromium)
python3 -c 'import ensurepip, venv' 2>/dev/null || apt_packages+=(python3-venv)
if [ "${#apt_packages[@]}" -gt 0 ]; then
  log "installing system packages: ${apt_packages[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
fi
# The Debian package starts a system broker on 1883 where systemd runs; edgeloop's demo and tests
# start their own brokers on free ports, so nothing here depends on that one.

# PostgreSQL: the storage tests run against a real server (EDGELOOP_TEST_PG_URL).
if [ -z "${EDGELOOP_TEST_PG_URL:-}" ]; then
  if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    log "starting PostgreSQL"
    cluster_ver=$(ls /etc/postgresql | sort -V | tail -n 1)
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$cluster_ver" main start || true
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
  fi
  # Prefer a passwordless connection (trust auth, as on CI); otherwise create a role with a password.
  if psql "postgresql://postgres@127.0.0.1:5432/postgres" -Atqc 'select 1' >/dev/null 2>&1; then
    PG_BASE="postgresql://postgres@127.0.0.1:5432"
  else
    log "creating PostgreSQL role 'edgeloop'"
    $SUDO -u postgres psql -qc "DO \$\$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='edgeloop') THEN CREATE ROLE edgeloop LOGIN CREATEDB PASSWORD 'edgeloop'; END IF; END\$\$;" \
      || su postgres -c "psql -qc \"DO \\\$\\\$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='edgeloop') THEN CREATE ROLE edgeloop LOGIN CREATEDB PASSWORD 'edgeloop'; END IF; END\\\$\\\$;\""
    PG_BASE="postgresql://edgeloop:edgeloop@127.0.0.1:5432"
  fi
  if ! psql "$PG_BASE/test" -Atqc 'select 1' >/dev/null 2>&1; then
    log "creating database 'test'"
    psql "$PG_BASE/postgres" -qc 'CREATE DATABASE test' >/dev/null
  fi
  mkdir -p var
  echo "postgresql+psycopg://${PG_BASE#postgresql://}/test" > var/test-pg-url
fi

# Python: one virtual environment with every extra (server, training, dev tools).
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import torch, torchvision, fastapi, onnxruntime' 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  log "creating the Python environment in .venv (torch is large: this takes a few minutes once)"
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".[dev]"
  touch .venv/.installed
fi
log "ready: $(.venv/bin/python -c 'import torch, onnxruntime; print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")')"
