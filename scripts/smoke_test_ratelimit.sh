#!/usr/bin/env bash
# Rate limit: a parallel burst with one key; expect mostly 429 with some 200 (RPS/BURST).
# Env: HOST, KEY (ratelimit), REQUESTS (50), PARALLEL (20).
set -euo pipefail
source "$(dirname "$0")/smoke_lib.sh"
KEY="${KEY:-ratelimit}"; REQUESTS="${REQUESTS:-50}"; PARALLEL="${PARALLEL:-20}"
codes=$(burst "$REQUESTS" "$PARALLEL" "200 429")
if [ "$(count "$codes" 429)" -eq 0 ] || [ "$(count "$codes" 200)" -eq 0 ]; then
  echo "FAIL: expected both 200 and 429"; exit 1
fi
echo "OK: rate limit"
