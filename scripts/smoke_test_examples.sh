#!/usr/bin/env bash
# The seed's two curl examples: streaming (data: lines, ending with [DONE]) and JSON, both 200.
set -euo pipefail
HOST="${HOST:-http://localhost:8080}"; KEY="${KEY:-demo}"
stream=$(curl -sN -w '\n%{http_code}' "$HOST/v1/chat/completions" -H 'Content-Type: application/json' -H "X-Api-Key: $KEY" \
  -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hola 👋"}],"stream":true}')
echo "$stream" | tail -4
[ "$(tail -1 <<<"$stream")" = "200" ] || { echo "FAIL: stream status"; exit 1; }
grep -q '^data: \[DONE\]$' <<<"$stream" || { echo "FAIL: no [DONE]"; exit 1; }
json=$(curl -s -w '\n%{http_code}' "$HOST/v1/chat/completions" -H 'Content-Type: application/json' -H "X-Api-Key: $KEY" \
  -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hola 👋"}],"stream":false}')
echo "$json"
[ "$(tail -1 <<<"$json")" = "200" ] || { echo "FAIL: json status"; exit 1; }
grep -q '"chat.completion"' <<<"$json" || { echo "FAIL: not a chat completion"; exit 1; }
echo "OK: seed examples"
