#!/usr/bin/env bash
# Cedar policies and SIGHUP reload: a free-plan tenant is denied a model (403 naming why), the
# policy file is edited, the gateway gets SIGHUP, and the same request is allowed; a broken edit
# is then refused on reload and the policies in force stay.
# The gateway runs with POLICY_FILE / POLICY_ENTITIES_FILE = copies of scripts/policies.example.cedar
# and scripts/policy-entities.example.json. This script EDITS POLICY_FILE: point it at a copy.
# Env: HOST, POLICY_FILE (the gateway's), GATEWAY_PID (the gateway's main process: it gets SIGHUP).
set -euo pipefail
HOST="${HOST:-http://localhost:8080}"
: "${POLICY_FILE:?set it to the POLICY_FILE of the gateway (a copy of scripts/policies.example.cedar)}"
: "${GATEWAY_PID:?set it to the main process id of the gateway}"

# ask KEY BODY: prints the status and the error message, if any
ask() {
  local reply
  reply=$(curl -s -w '\n%{http_code}' --max-time 30 "$HOST/v1/chat/completions" \
    -H 'Content-Type: application/json' -H "X-Api-Key: $1" -d "$2")
  printf '%s %s\n' "$(tail -1 <<<"$reply")" "$(head -n -1 <<<"$reply" | sed -n 's/.*"message":"\([^"]*\)".*/\1/p')"
}
expect() {  # expect "STATUS[ MESSAGE]" KEY BODY
  local got; got=$(ask "$2" "$3")
  echo "  $2 -> $got"
  [ "$got" = "$1" ] || [ "$got" = "$1 " ] || { echo "FAIL: expected $1"; exit 1; }
}
reloads() { curl -s "$HOST/metrics" | sed -n "s/^config_reloads_total{result=\"$1\"} \([0-9]*\).*/\1/p"; }
wait_reloads() {  # wait_reloads RESULT COUNT
  for _ in $(seq 100); do [ "$(reloads "$1")" = "$2" ] && return 0; sleep 0.1; done
  echo "FAIL: config_reloads_total{result=\"$1\"} never reached $2"; exit 1
}
mini='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
gpt4o='{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'
tools='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"f"}}]}'
ok=$(reloads ok); refused=$(reloads refused)

echo "free plan: basic models only, no tools"
expect 200 free-demo "$mini"
expect "403 no policy permits this request" free-demo "$gpt4o"
expect "403 denied by policy free-no-tools" free-demo "$tools"
expect 200 team-demo "$gpt4o"

echo "edit $POLICY_FILE (a gpt-4o trial for free-demo), then kill -HUP $GATEWAY_PID"
cat >>"$POLICY_FILE" <<'CEDAR'

@id("free-demo-trial-gpt-4o")
permit (principal == Tenant::"free-demo", action, resource == Model::"gpt-4o");
CEDAR
kill -HUP "$GATEWAY_PID"
wait_reloads ok $((ok + 1))
echo "  config_reloads_total{result=\"ok\"} $((ok + 1))"
expect 200 free-demo "$gpt4o"
expect "403 denied by policy free-no-tools" free-demo "$tools"

echo "a broken edit is refused on reload; the policies in force stay"
echo 'forbid (principal, action, resource) when {' >>"$POLICY_FILE"
kill -HUP "$GATEWAY_PID"
wait_reloads refused $((refused + 1))
echo "  config_reloads_total{result=\"refused\"} $((refused + 1))"
expect 200 free-demo "$gpt4o"
echo "OK: policies and reload"
