#!/usr/bin/env bash
# Installs the LiteLLM proxy the wire tests run against (tests/tests/wire_litellm.rs) into the
# repo-local, gitignored venv tests/peers/.venv-litellm: litellm[proxy]==1.81.16 from
# requirements.txt, every dependency pinned by constraints.txt (a `pip freeze`). Needs Python 3.11
# (python3.11, else python3; or set PYTHON) and PyPI through pip; nothing else outside the repo.
#
# Idempotent: the venv records the sha256 of requirements.txt, constraints.txt and the Python
# version it was built from; when they match, this is a no-op taking milliseconds. When they do
# not (or the venv is broken), the venv is rebuilt from scratch (about 1.5 min on 2 cores).
#
# Usage: bash tests/peers/litellm/install.sh            install or check
#        bash tests/peers/litellm/install.sh --force    rebuild even if up to date
#        bash tests/peers/litellm/install.sh --freeze   rewrite constraints.txt from a fresh
#                                                      unconstrained install (to upgrade)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$(cd "$HERE/.." && pwd)/.venv-litellm"
MARKER="$VENV/.agentq-install-hash"
REQ="$HERE/requirements.txt"
CONSTRAINTS="$HERE/constraints.txt"

log() { printf '==> litellm peer: %s\n' "$*" >&2; }

mode="${1:-}"
case "$mode" in
  "" | --force | --freeze) ;;
  *) echo "usage: $0 [--force|--freeze]" >&2; exit 2 ;;
esac

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if command -v python3.11 >/dev/null 2>&1; then PY=python3.11; else PY=python3; fi
fi
command -v "$PY" >/dev/null 2>&1 || { log "$PY not found: install Python 3.11"; exit 1; }
PYVER="$("$PY" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
case "$PYVER" in
  3.11.*) ;;
  *) log "warning: constraints.txt was frozen with Python 3.11, $PY is $PYVER" ;;
esac

want="$( { cat "$REQ" "$CONSTRAINTS"; echo "python $PYVER"; } | sha256sum | cut -d' ' -f1)"

if [ "$mode" = "" ] && [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$want" ] \
    && [ -x "$VENV/bin/litellm" ] && [ -x "$VENV/bin/python" ]; then
  log "up to date in $VENV (requirements hash ${want:0:12})"
  exit 0
fi

if [ -e "$VENV" ]; then
  log "removing stale $VENV"
  rm -rf "$VENV"
fi
log "creating $VENV with $PY ($PYVER)"
"$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input)

if [ "$mode" = "--freeze" ]; then
  log "installing $(grep -v '^#' "$REQ" | xargs) without constraints, then freezing"
  "${pip[@]}" install --quiet -r "$REQ"
  {
    echo "# pip freeze of tests/peers/.venv-litellm after installing requirements.txt with Python $PYVER"
    echo "# (install.sh --freeze regenerates it). Used as a constraints file: exact versions of everything."
    "${pip[@]}" freeze
  } >"$CONSTRAINTS"
  log "wrote $CONSTRAINTS ($(grep -vc '^#' "$CONSTRAINTS") packages); run install.sh again to mark the venv"
  exit 0
fi

t0=$SECONDS
log "installing $(grep -v '^#' "$REQ" | xargs) with $(grep -vc '^#' "$CONSTRAINTS") pinned dependencies from PyPI"
"${pip[@]}" install --quiet -r "$REQ" -c "$CONSTRAINTS"
version="$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("litellm"))')"
echo "$want" >"$MARKER"
log "installed litellm $version in $((SECONDS - t0)) s: $VENV/bin/litellm"
