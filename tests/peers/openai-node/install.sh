#!/usr/bin/env bash
# Installs the official OpenAI Node SDK (npm `openai`, pinned in package-lock.json) into
# tests/peers/openai-node/node_modules for the front-door tests (tests/tests/openai_chat.rs runs
# tests/sdk/chat.mjs with it). Needs Node >= 20 and npm; reaches only the npm registry.
# Idempotent: a no-op when the installed tree already matches the lock file.
# Usage: bash tests/peers/openai-node/install.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec bash "$here/../npm-ci.sh" "$here" openai-node node_modules/openai/package.json openai
