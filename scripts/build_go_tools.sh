#!/usr/bin/env bash
# Install the Go-distributed code generators into bin/ at pinned versions (called by `make deps`).
#
# Today that is grpc-gateway's protoc-gen-openapiv2, which `make generate` (buf.gen.yaml) runs to
# write gen/openapi/azora.swagger.json. The OpenAPI document is committed and checked for
# staleness, so every machine must run the very same generator version: the pin below is the
# single place to change it, and changing it means running `make generate` and committing the
# regenerated document. (grpcurl is installed by the Makefile's own `grpcurl` target and
# FerretDB by scripts/build_ferretdb.sh.)
#
# `go install module/cmd@vX.Y.Z` with an exact version asks the Go module proxy only for that
# version (never for the version list) and checks it against the checksum database, so no
# tools module with its own go.sum is needed here.
#
# Idempotent: a tool whose build info already shows the pinned module version is left alone.
# Environment: GO (go command, default: `go` on PATH, else /usr/local/go/bin/go).
set -euo pipefail

# package path, module path, version: one line per tool.
tools=(
  "github.com/grpc-ecosystem/grpc-gateway/v2/protoc-gen-openapiv2 github.com/grpc-ecosystem/grpc-gateway/v2 v2.33.0"
)

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin_dir="$repo_root/bin"

GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
if ! "$GO" version >/dev/null 2>&1; then
  echo "build_go_tools: Go toolchain not found (set GO=/path/to/go)" >&2
  exit 1
fi

mkdir -p "$bin_dir"
for tool in "${tools[@]}"; do
  read -r package module version <<<"$tool"
  binary="$bin_dir/${package##*/}"
  # Binaries built by `go install` carry their module version in the build info (`go version -m`
  # prints "\tmod\t<module>\t<version>\t<sum>"); their own --version flags are not reliable.
  if [[ -x "$binary" ]] && "$GO" version -m "$binary" 2>/dev/null \
    | awk -v m="$module" -v v="$version" '$1 == "mod" && $2 == m && $3 == v { found = 1 } END { exit !found }'; then
    continue
  fi
  echo "build_go_tools: installing $package@$version into bin/" >&2
  GOBIN="$bin_dir" "$GO" install "$package@$version"
done
