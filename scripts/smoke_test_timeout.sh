#!/usr/bin/env bash
# First-byte timeout: needs an upstream slower than TIMEOUT_SECS (mock: LATENCY_MS=5000).
# Env: HOST, KEY (timeout-test), MAX_SECS (10: the 504 must come sooner than this).
set -euo pipefail
source "$(dirname "$0")/smoke_lib.sh"
KEY="${KEY:-timeout-test}"; MAX_SECS="${MAX_SECS:-10}"
out=$(curl -s -i --max-time 60 -w '\nTIME %{time_total}\n' -H "Content-Type: application/json" \
  -H "X-Api-Key: $KEY" -d "$BODY" "$HOST/v1/chat/completions")
sed -n '1p' <<<"$out"; grep -E '^\{' <<<"$out" || true
status=$(sed -n '1s/^HTTP\/[0-9.]* \([0-9]*\).*/\1/p' <<<"$out")
secs=$(sed -n 's/^TIME //p' <<<"$out")
echo "status $status after ${secs}s"
[ "$status" = "504" ] || { echo "FAIL: expected 504 (start the gateway with TIMEOUT_SECS=2 LATENCY_MS=5000 make run)"; exit 1; }
grep -q '"upstream timed out"' <<<"$out" || { echo "FAIL: expected 'upstream timed out'"; exit 1; }
awk -v s="$secs" -v m="$MAX_SECS" 'BEGIN { exit !(s < m) }' || { echo "FAIL: took ${secs}s"; exit 1; }
echo "OK: timeout"
