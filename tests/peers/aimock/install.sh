#!/usr/bin/env bash
# Installs aimock (@copilotkit/aimock, pinned in package-lock.json) into tests/peers/aimock/node_modules
# for the wire tests (tests/tests/wire_aimock.rs). Needs Node >= 20.15 and npm; reaches only the npm
# registry. Idempotent: a no-op when the installed tree already matches the lock file.
# Usage: bash tests/peers/aimock/install.sh
set -euo pipefail
cd "$(dirname "$0")"

for tool in node npm; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "aimock install: '$tool' not found; install Node.js >= 20.15 (with npm) first" >&2
    exit 1
  }
done
node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 15) ? 0 : 1)' || {
  echo "aimock install: Node $(node --version) is too old; aimock 1.43.0 needs >= 20.15" >&2
  exit 1
}

exec bash "$(pwd)/../npm-ci.sh" "$(pwd)" aimock node_modules/@copilotkit/aimock/dist/cli.js \
  @copilotkit/aimock
