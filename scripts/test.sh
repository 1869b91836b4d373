#!/usr/bin/env bash
# The suite in two passes: first every test that asserts no time, spread over the machine's
# cores (pytest-xdist, one test file per worker at a time so a file's shared gateway starts
# once); then the tests marked `serial` (they time /healthz or a deadline), alone, so that a
# neighbouring worker's CPU cannot fail them. Arguments go to both passes (files, -k, -x ...).
#   TEST_WORKERS=1 scripts/test.sh   # one process, as before
set -uo pipefail
cd "$(dirname "$0")/.."
# Compiled modules are kept (__pycache__/, git-ignored) even where the environment says not to
# write them: every gateway the tests start from source (and each pytest process) compiled
# gateway/ again otherwise, ~0.35 s of CPU a start, a few hundred starts a run.
unset PYTHONDONTWRITEBYTECODE
py=${PYTHON:-.venv/bin/python}
workers=${TEST_WORKERS:-$(nproc 2>/dev/null || echo 1)}
if [ "$workers" -gt 1 ]; then
  spread=(-n "$workers" --dist loadfile)
else
  spread=(-p no:xdist)
fi
"$py" -m pytest -q "${spread[@]}" -m "not serial" "$@"
first=$?
"$py" -m pytest -q -p no:xdist -m serial "$@"
second=$?
# 5 is "no test selected": a file with no serial test, or only serial ones.
[ "$first" -eq 5 ] && first=0
[ "$second" -eq 5 ] && second=0
[ "$first" -eq 0 ] && exit "$second"
exit "$first"
