#!/usr/bin/env bash
# make bench: install what the benchmark needs (Debian's nginx and wrk; node is on the machine
# or from Debian), then run it. Loads are bounded in time and target 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
missing=()
command -v nginx >/dev/null || missing+=(nginx-light)
command -v wrk >/dev/null || missing+=(wrk)
command -v node >/dev/null || missing+=(nodejs)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v taskset >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
PYTHONPATH=. .venv/bin/python bench/redaction.py | tee bench/results/redaction.md
exec .venv/bin/python bench/run.py "$@"
