#!/usr/bin/env bash
# Quota rollover: sequential requests with one key give 200 until the quota, then 429.
# Env: HOST, KEY (quota-demo), REQUESTS (7), EXPECT_QUOTA (5; the gateway's DEFAULT_QUOTA),
#      REDIS_URL (if set, the counter is cleared first and inspected after, with redis-cli).
set -euo pipefail
source "$(dirname "$0")/smoke_lib.sh"
KEY="${KEY:-quota-demo}"; REQUESTS="${REQUESTS:-7}"; EXPECT_QUOTA="${EXPECT_QUOTA:-5}"
if [ -n "${REDIS_URL:-}" ]; then redis-cli -u "$REDIS_URL" DEL "quota:$KEY" >/dev/null; fi
codes=$(fire "$REQUESTS" 1)
echo "$codes" | nl -w2 -s': '
check_only "$codes" "200 429"
expected=$(printf '200\n%.0s' $(seq "$EXPECT_QUOTA"); printf '429\n%.0s' $(seq $((REQUESTS - EXPECT_QUOTA))))
if [ "$codes" != "$(echo "$expected" | sed '/^$/d')" ]; then
  echo "FAIL: expected 200x$EXPECT_QUOTA then 429 (EXPECT_QUOTA is the gateway's quota: DEFAULT_QUOTA=$EXPECT_QUOTA make run)"
  exit 1
fi
if [ -n "${REDIS_URL:-}" ]; then
  echo "GET quota:$KEY = $(redis-cli -u "$REDIS_URL" GET "quota:$KEY"), TTL = $(redis-cli -u "$REDIS_URL" TTL "quota:$KEY")"
fi
echo "OK: quota rollover"
