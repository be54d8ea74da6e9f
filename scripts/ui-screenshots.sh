#!/usr/bin/env bash
# Refreshes the console's screenshots in docs/ui/ (shown in README.md, "Web console"): a private
# stack with demo data, every page at 1280 px and at a phone's 390 px. Commit the PNGs it writes.
# Usage: bash scripts/ui-screenshots.sh [DIR]   (default docs/ui)
exec bash "$(dirname "$0")/ui-test.sh" --screenshots "$@"
