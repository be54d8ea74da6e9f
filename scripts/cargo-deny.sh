#!/usr/bin/env bash
# Supply-chain check: `cargo deny` over the locked dependency graph with the policy in deny.toml
# (licenses, bans including duplicate versions, sources; docs/security.md, "Supply chain").
# Installs cargo-deny from crates.io (`cargo install --locked`) into .tools/cargo when it is missing
# there (a first install compiles it: a few minutes), then reuses it.
# Advisories are not checked: the RustSec database is a git repository on GitHub, which CI cannot
# reach (deny.toml says more). Usage: bash scripts/cargo-deny.sh
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DENY_VERSION=0.20.2
TOOLS="$PWD/.tools/cargo"
DENY="$TOOLS/bin/cargo-deny"

if [[ ! -x "$DENY" ]] || [[ "$("$DENY" --version 2>/dev/null)" != "cargo-deny $CARGO_DENY_VERSION" ]]; then
  echo "installing cargo-deny $CARGO_DENY_VERSION into $TOOLS (cargo install --locked; compiles once)"
  cargo install --locked --root "$TOOLS" "cargo-deny@$CARGO_DENY_VERSION"
fi

"$DENY" --version
exec "$DENY" --locked check licenses bans sources
