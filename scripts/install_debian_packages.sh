#!/usr/bin/env bash
# Install the given Debian packages if any is missing (called by `make deps` with $(APT_PACKAGES)).
#
# Fast when everything is installed: only dpkg is asked. `apt-get update` runs once, and only when
# something has to be installed. Needs root (or passwordless sudo) only in that case.
set -euo pipefail

missing=()
for package in "$@"; do
  status="$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)"
  if [[ "$status" != "install ok installed" ]]; then
    missing+=("$package")
  fi
done
if ((${#missing[@]} == 0)); then
  exit 0
fi

sudo=()
if ((EUID != 0)); then
  sudo=(sudo)
fi
echo "install_debian_packages: installing ${missing[*]}" >&2
# `env` rather than export: sudo would drop an exported DEBIAN_FRONTEND.
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -q --no-install-recommends "${missing[@]}"
