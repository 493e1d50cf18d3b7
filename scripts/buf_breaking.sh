#!/usr/bin/env bash
# `buf breaking` against branch main (called by `make lint` and the pre-commit hook).
#
# There is no baseline to compare with until `main` has a commit containing protos/, so the
# check is skipped (and says so) on a fresh repository.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

buf="${BUF:-node_modules/.bin/buf}"
if git rev-parse --verify -q main >/dev/null && git cat-file -e main:protos 2>/dev/null; then
  echo "$buf breaking --against '.git#branch=main'"
  "$buf" breaking --against '.git#branch=main'
else
  echo "buf breaking: skipped (branch main has no commit with protos/ yet)"
fi
