#!/usr/bin/env bash
# make run: the mock upstream in the background, the gateway in the foreground; Ctrl-C stops both.
# Once the gateway answers, a short banner on stderr says where everything is (stdout stays the
# gateway's JSON request log).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
MOCK_PORT="${MOCK_PORT:-4000}"

# A connect that succeeds within a second (an address that is not ours could hang for minutes).
answers() { timeout 1 bash -c 'echo > "/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null; }

# The effective configuration, as the gateway will read it (.env under the environment): a bad
# value stops here with the gateway's own one-line message, before anything is started.
config="$("$PY" gateway.py --check-config)"
setting() { sed -n "s/^$1=//p" <<<"$config"; }
listen="$(setting LISTEN_ADDR)"
upstream="$(setting OPENAI_BASE_URL)"
port="${listen##*:}"
host="${listen%:*}"
host="${host#[}"
host="${host%]}"
case "$host" in
  0.0.0.0 | "") probe=127.0.0.1 shown=localhost ;;
  ::) probe=::1 shown=localhost ;;
  *:*) probe="$host" shown="[$host]" ;;
  *) probe="$host" shown="$host" ;;
esac

# Something already answering on either port would pass for ours below (another `make run`?).
must_be_free() {
  if answers "$1" "$2"; then
    echo "make run: $1:$2 is already in use: stop what listens there, or set $3 to another port" >&2
    exit 1
  fi
}
must_be_free 127.0.0.1 "$MOCK_PORT" "MOCK_PORT (and OPENAI_BASE_URL, ANTHROPIC_BASE_URL to match)"
must_be_free "$probe" "$port" LISTEN_ADDR

PORT="$MOCK_PORT" "$PY" mock/server.py &
mock_pid=$!
announce_pid=
trap 'kill $mock_pid $announce_pid 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 100); do
  answers 127.0.0.1 "$MOCK_PORT" && break
  kill -0 "$mock_pid" 2>/dev/null || { echo "make run: the mock upstream did not start" >&2; exit 1; }
  sleep 0.1
done

announce() {
  for _ in $(seq 600); do  # up to a minute: the first start on a slow machine compiles bytecode
    if answers "$probe" "$port"; then
      cat >&2 <<EOF

  secure-llm-gateway is up
    gateway   http://$shown:$port      (LISTEN_ADDR=$listen)
    metrics   http://$shown:$port/metrics
    mock      http://127.0.0.1:$MOCK_PORT      (the bundled fake upstream; OPENAI_BASE_URL=$upstream)
    try it    the curl examples at the top of README.md
    stop      Ctrl-C here: in-flight requests drain, then the gateway and the mock exit

EOF
      return
    fi
    sleep 0.1
  done
}
announce &
announce_pid=$!

# The gateway reads .env itself (the real environment wins over it).
"$PY" gateway.py
