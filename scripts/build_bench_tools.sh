#!/usr/bin/env bash
# Install what `make bench`, `make soak` and `make drills` need beyond `make deps`.
#
# * Debian packages given as arguments (the Makefile's BENCH_APT_PACKAGES: postfix for
#   smtp-source, smtp-sink and the Postfix relay; opendkim + opendkim-tools for the milter and
#   its key). Postfix's installer asks what kind of mail system to set up; it is preseeded with
#   "No configuration", so it installs the programs, writes no /etc/postfix/main.cf and starts
#   nothing (the benchmarks run their own instance with `postfix -c <run dir>`).
# * ghz, the gRPC load generator, into bin/ at the pinned version below (the newest tag the Go
#   module proxy serves when this was written), the same way build_go_tools.sh pins its tools.
#
# Idempotent; apt is only asked when a package is missing.
# Environment: GO (go command, default: `go` on PATH, else /usr/local/go/bin/go).
set -euo pipefail

GHZ_VERSION=v0.93.0

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin_dir="$repo_root/bin"

if (($# > 0)); then
  missing=0
  for package in "$@"; do
    status="$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)"
    [[ "$status" == "install ok installed" ]] || missing=1
  done
  if ((missing)); then
    sudo=()
    ((EUID == 0)) || sudo=(sudo)
    echo "postfix postfix/main_mailer_type select No configuration" \
      | "${sudo[@]}" debconf-set-selections
    "$repo_root/scripts/install_debian_packages.sh" "$@"
  fi
fi

GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
binary="$bin_dir/ghz"
if [[ -x "$binary" ]] && "$GO" version -m "$binary" 2>/dev/null \
  | awk -v v="$GHZ_VERSION" '$1 == "mod" && $2 == "github.com/bojand/ghz" && $3 == v { f = 1 } END { exit !f }'; then
  exit 0
fi
echo "build_bench_tools: installing ghz $GHZ_VERSION into bin/" >&2
mkdir -p "$bin_dir"
GOBIN="$bin_dir" "$GO" install "github.com/bojand/ghz/cmd/ghz@$GHZ_VERSION"
