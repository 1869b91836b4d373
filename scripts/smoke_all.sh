#!/usr/bin/env bash
# Every smoke script against a real gateway: starts the mock and the gateway command on free
# ports for each scenario (and a throw-away redis-server for the quota one, if installed),
# runs the script, stops everything. Exits non-zero on any unexpected status.
#   scripts/smoke_all.sh                 # python gateway.py
#   scripts/smoke_all.sh dist/gateway    # the frozen binary
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY="$ROOT/.venv/bin/python"; [ -x "$PY" ] || PY=python3
if [ $# -gt 0 ]; then GATEWAY=("$@"); [ -x "$ROOT/$1" ] && GATEWAY[0]="$ROOT/$1"; else GATEWAY=("$PY" "$ROOT/gateway.py"); fi
WORK=$(mktemp -d)
pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
}
trap 'stop_all; rm -rf "$WORK"' EXIT

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() {
  for _ in $(seq 150); do curl -fs -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "FAIL: $1 did not come up"; return 1
}

# scenario NAME "MOCK VAR=..." "GATEWAY VAR=..." SCRIPT "SCRIPT VAR=..."
scenario() {
  local name=$1 mock_env=$2 gw_env=$3 script=$4 script_env=$5 mock_port gw_port
  mock_port=$(free_port); gw_port=$(free_port)
  echo "=== $name"
  env PORT="$mock_port" CHUNK_DELAY_MS=20 $mock_env "$PY" "$ROOT/mock/server.py" >"$WORK/mock.log" 2>&1 & pids+=($!)
  wait_http "http://127.0.0.1:$mock_port/_mock/events"
  mkdir -p "$WORK/$name"
  (cd "$WORK/$name" && exec env LISTEN_ADDR="127.0.0.1:$gw_port" OPENAI_BASE_URL="http://127.0.0.1:$mock_port" \
     OPENAI_API_KEY=sk-smoke $gw_env "${GATEWAY[@]}" >"$WORK/$name/gateway.log" 2>&1) & pids+=($!)
  wait_http "http://127.0.0.1:$gw_port/healthz"
  if ! env HOST="http://127.0.0.1:$gw_port" GATEWAY_PID="${pids[-1]}" $script_env "$ROOT/scripts/$script"; then
    echo "--- gateway output"; tail -20 "$WORK/$name/gateway.log"; return 1
  fi
  stop_all
}

scenario seed-curl-examples "" "RPS=0" smoke_test_examples.sh ""
redis_env="" quota_script_env=""
if command -v redis-server >/dev/null; then
  redis_port=$(free_port)
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" >/dev/null & redis_pid=$!
  trap 'stop_all; kill $redis_pid 2>/dev/null || true; rm -rf "$WORK"' EXIT
  for _ in $(seq 50); do redis-cli -p "$redis_port" PING >/dev/null 2>&1 && break; sleep 0.1; done
  redis_env="REDIS_URL=redis://127.0.0.1:$redis_port/0"; quota_script_env="$redis_env"
fi
scenario quota "" "DEFAULT_QUOTA=5 RPS=0 $redis_env" smoke_test_quota.sh "EXPECT_QUOTA=5 $quota_script_env"
scenario tenant-override "" "DEFAULT_QUOTA=100 TENANT_QUOTAS=tenantA=5,tenantB=8 RPS=0" smoke_test_quota.sh "KEY=tenantB REQUESTS=10 EXPECT_QUOTA=8"
scenario ratelimit "" "RPS=5 BURST=10" smoke_test_ratelimit.sh ""
scenario load-shed "LATENCY_MS=300" "MAX_CONCURRENCY=1 RPS=0" smoke_test_load_shed.sh ""
scenario timeout "LATENCY_MS=5000" "TIMEOUT_SECS=2 RPS=0" smoke_test_timeout.sh "MAX_SECS=4"
cp scripts/policies.example.cedar "$WORK/policies.cedar"; cp scripts/policy-entities.example.json "$WORK/entities.json"
scenario policy-reload "" "RPS=0 POLICY_FILE=$WORK/policies.cedar POLICY_ENTITIES_FILE=$WORK/entities.json" \
  smoke_test_policy_reload.sh "POLICY_FILE=$WORK/policies.cedar"
echo "ALL SMOKE TESTS PASSED"
