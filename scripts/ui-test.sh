#!/usr/bin/env bash
# The web console's tests in a real browser (issue 21): Debian's headless chromium driven by
# Playwright for Python (tests/ui/console_test.py) against a private stack of the debug binaries
# (redis-server, the mock LLM, agentq-api with auth on, one agentq-worker), plus the SSE parser's
# unit tests under node (tests/ui/sse.test.mjs).
#
# Installs what is missing: chromium from Debian's packages (apt; needs root or sudo), and the
# pinned Python packages of tests/ui/requirements.txt into the gitignored venv tests/ui/.venv
# (rebuilt when the file changes). Playwright's own browser download is never used.
#
# Usage: bash scripts/ui-test.sh [test name filter...]     (exit 0 = every test passed)
#        bash scripts/ui-test.sh --screenshots [DIR]       refresh docs/ui/*.png (scripts/ui-screenshots.sh)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/lib.sh

log() { printf '==> ui: %s\n' "$*" >&2; }

ensure_redis
ensure_cmd node nodejs
if [ ! -x /usr/bin/chromium ]; then
  log "installing chromium (apt)"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi

VENV="$ROOT/tests/ui/.venv"
REQ="$ROOT/tests/ui/requirements.txt"
want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.agentq-install-hash" 2>/dev/null)" != "$want" ]; then
  log "installing $(grep -c '==' "$REQ") pinned packages into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$REQ"
  echo "$want" >"$VENV/.agentq-install-hash"
fi

if [ "${1:-}" = "--screenshots" ]; then
  shift
  log "building the binaries"
  cargo build --workspace --bins --locked
  out="$(realpath -m "${1:-$ROOT/docs/ui}")"
  cd tests/ui
  exec "$VENV/bin/python" screenshots.py "$out"
fi

log "SSE parser (node --test)"
node --test tests/ui/

log "building the binaries"
cargo build --workspace --bins --locked
log "browser tests"
cd tests/ui
"$VENV/bin/python" console_test.py "$@"
