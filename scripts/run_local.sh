#!/usr/bin/env bash
# make run: the mock upstream in the background, the gateway in the foreground; Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
MOCK_PORT="${MOCK_PORT:-4000}"
PORT="$MOCK_PORT" "$PY" mock/server.py &
mock_pid=$!
trap 'kill "$mock_pid" 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 50); do
  (echo > "/dev/tcp/127.0.0.1/$MOCK_PORT") 2>/dev/null && break
  sleep 0.1
done
# The gateway reads .env itself (the real environment wins over it).
"$PY" gateway.py
