#!/usr/bin/env bash
# Make docker.io/library/python:3.11-slim available to podman: pull it, or, where no container registry can be
# reached (these machines, CI), build a stand-in from Debian packages with mmdebstrap and tag it with that name,
# so the project's Dockerfile builds unchanged with --pull=never. Needs root.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
image=docker.io/library/python:3.11-slim

if podman image exists "$image"; then
  echo "base: $image is here"; exit 0
fi
if timeout 120 podman pull -q "$image" >/dev/null 2>&1; then
  echo "base: pulled $image"; exit 0
fi
echo "base: $image cannot be pulled; building a stand-in from Debian bookworm packages"

# The apt mirror this machine is set up with (deb822 .sources or a one-line sources.list).
mirror_of() {  # suite directory name, e.g. debian or debian-security
  { grep -hoE "^[^#]*https?://[^ ]+/$1/?( |$)" /etc/apt/sources.list.d/*.sources /etc/apt/sources.list \
      2>/dev/null || true; } | grep -oE "https?://[^ ]+" | head -1 | sed 's#/$##'
}
debian="$(mirror_of debian)"; security="$(mirror_of debian-security)"
[ -n "$debian" ] || { echo "base: no Debian mirror found in /etc/apt/sources.list*; cannot build a stand-in" >&2; exit 1; }
security="${security:-${debian%/debian}/debian-security}"

work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
mmdebstrap --quiet --variant=minbase --include=ca-certificates,python3,python3-venv bookworm "$work/rootfs.tar" \
  "deb $debian bookworm main" "deb $debian bookworm-updates main" "deb $security bookworm-security main"
podman import -q "$work/rootfs.tar" localhost/debian-local:bookworm >/dev/null

mkdir -p "$work/ctx/ca-certificates"
cp "$here/Containerfile.python-slim" "$work/ctx/Containerfile"
cp /usr/local/share/ca-certificates/*.crt "$work/ctx/ca-certificates/" 2>/dev/null || true
podman build -q --format docker --pull=never -t "$image" "$work/ctx" >/dev/null
podman rmi -f localhost/debian-local:bookworm >/dev/null
echo "base: built the stand-in $image"
