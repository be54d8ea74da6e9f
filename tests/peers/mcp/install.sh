#!/usr/bin/env bash
# Installs the reference MCP server (@modelcontextprotocol/server-everything, pinned in
# package-lock.json) into tests/peers/mcp/node_modules for the agent tests
# (tests/tests/agents_mcp.rs). Needs Node >= 20 and npm; reaches only the npm registry.
# Idempotent: a no-op when the installed tree already matches the lock file.
# Usage: bash tests/peers/mcp/install.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec bash "$here/../npm-ci.sh" "$here" mcp \
  node_modules/@modelcontextprotocol/server-everything/dist/index.js \
  @modelcontextprotocol/server-everything
