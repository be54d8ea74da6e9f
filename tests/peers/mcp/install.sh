#!/usr/bin/env bash
# Installs the reference MCP server (@modelcontextprotocol/server-everything, pinned in
# package-lock.json) into tests/peers/mcp/node_modules for the agent tests
# (tests/tests/agents_mcp.rs). Needs Node >= 20 and npm; reaches only the npm registry.
# Idempotent: a no-op when the installed tree already matches the lock file.
# Usage: bash tests/peers/mcp/install.sh
set -euo pipefail
cd "$(dirname "$0")"

for tool in node npm; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "mcp install: '$tool' not found; install Node.js >= 20 (with npm) first" >&2
    exit 1
  }
done

stamp=node_modules/.agentq-installed
entry=node_modules/@modelcontextprotocol/server-everything/dist/index.js
if [ -f "$stamp" ] && [ -f "$entry" ] && cmp -s "$stamp" package-lock.json; then
  exit 0
fi

echo "mcp install: npm ci in $(pwd)"
npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
cp package-lock.json "$stamp"
echo "mcp install: server-everything $(node -p "require('./node_modules/@modelcontextprotocol/server-everything/package.json').version") ready"
