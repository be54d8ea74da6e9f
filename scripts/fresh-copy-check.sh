#!/usr/bin/env bash
# Proves that the repository stands on its own: copies the files git knows (committed or not,
# ignored ones left out: no target/, .venv/, .tools/) into a new temporary folder that has nothing
# beside them, checks that no ../shared is reachable from there, and runs `bash deploy/check.sh` in
# the copy. The copy installs its own tools from the package registries. Cargo's build cache is
# shared with this checkout (CARGO_TARGET_DIR) only to save time; it holds no source.
# Usage: bash scripts/fresh-copy-check.sh [COMMAND...]   (default: bash deploy/check.sh)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

outer=$(mktemp -d "${TMPDIR:-/tmp}/agentq-fresh.XXXXXX")
trap 'rm -rf "$outer"' EXIT
copy=$outer/agentq
mkdir "$copy"
git ls-files -z --cached --others --exclude-standard |
  tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$copy"
if [ -e "$copy/../shared" ] || [ -n "$(ls -A "$outer" | grep -vx agentq)" ]; then
  echo "fresh-copy-check: $outer holds more than the copy" >&2
  exit 1
fi
echo "==> copy of $(git ls-files | wc -l) files in $copy (nothing beside it); running: ${*:-bash deploy/check.sh}"
cd "$copy"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
if [ $# -gt 0 ]; then
  "$@"
else
  bash deploy/check.sh
fi
