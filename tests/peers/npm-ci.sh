#!/usr/bin/env bash
# The npm peers' install step (aimock/, mcp/, openai-node/ call it from their install.sh):
# `npm ci` in the peer's folder from its package-lock.json, reaching only the npm registry; a no-op
# when node_modules already matches the lock file (after a successful `npm ci` the lock file is
# copied to node_modules/.agentq-installed) and ENTRY is there.
# Usage: bash tests/peers/npm-ci.sh DIR LABEL ENTRY PACKAGE   (ENTRY relative to DIR)
set -euo pipefail
dir=$1 label=$2 entry=$3 package=$4
cd "$dir"

for tool in node npm; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "$label install: '$tool' not found; install Node.js >= 20 (with npm) first" >&2
    exit 1
  }
done

stamp=node_modules/.agentq-installed
if [ -f "$stamp" ] && [ -f "$entry" ] && cmp -s "$stamp" package-lock.json; then
  exit 0
fi

echo "$label install: npm ci in $(pwd)"
npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
cp package-lock.json "$stamp"
echo "$label install: $package $(node -p "require('./node_modules/$package/package.json').version") ready"
