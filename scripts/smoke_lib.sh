# Shared by the smoke scripts: fire requests, tally status codes, fail on surprises.
HOST="${HOST:-http://localhost:8080}"
DEFAULT_BODY='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"ping"}],"stream":false}'
BODY="${BODY:-$DEFAULT_BODY}"

one_request() {
  curl -s -o /dev/null -w "%{http_code}\n" --max-time 30 \
    -H "Content-Type: application/json" -H "X-Api-Key: $KEY" -d "$BODY" "$HOST/v1/chat/completions"
}
export -f one_request
export HOST BODY

# fire N P: N requests, P at a time; prints one status code per line.
fire() {
  seq "$1" | KEY="$KEY" xargs -P "$2" -I{} bash -c one_request
}

# check_only "codes" "allowed codes": fail if any code is outside the allowed set.
check_only() {
  local codes="$1" allowed="$2" code
  for code in $codes; do
    case " $allowed " in *" $code "*) ;; *) echo "FAIL: unexpected status $code"; return 1 ;; esac
  done
}

count() { grep -c "^$2\$" <<<"$1" || true; }

# burst N P "allowed codes": fire, print the tally, fail on a code outside the set; echoes the codes.
burst() {
  local codes
  codes=$(fire "$1" "$2")
  sort <<<"$codes" | uniq -c >&2
  check_only "$codes" "$3" >&2 || return 1
  echo "$codes"
}
