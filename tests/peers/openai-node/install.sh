#!/usr/bin/env bash
# Installs the official OpenAI Node SDK (npm `openai`, pinned in
# package-lock.json) into tests/peers/openai-node/node_modules for the front-door
# tests (tests/tests/openai_chat.rs, tests/sdk/chat.mjs). Needs Node >= 20 and npm; reaches only the npm registry.
# Idempotent: a no-op when the installed tree already matches the lock file.
# Usage: bash tests/peers/openai-node/install.sh
set -euo pipefail
cd "$(dirname "$0")"

for tool in node npm; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "openai-node install: '$tool' not found; install Node.js >= 20 (with npm) first" >&2
    exit 1
  }
done

stamp=node_modules/.agentq-installed
entry=node_modules/openai/package.json
if [ -f "$stamp" ] && [ -f "$entry" ] && cmp -s "$stamp" package-lock.json; then
  exit 0
fi

echo "openai-node install: npm ci in $(pwd)"
npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
cp package-lock.json "$stamp"
echo "openai-node install: openai $(node -p "require('./node_modules/openai/package.json').version") ready"
