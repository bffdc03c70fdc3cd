#!/usr/bin/env bash
# Makes a local stand-in for python:3.11-slim-bookworm where no container registry can be reached but
# Debian's archive can: a minimal Debian bookworm with python3 (3.11), venv and pip, imported into podman.
#
#   docker/make-base-image.sh [IMAGE]      (default localhost/python-base:bookworm; needs root, debootstrap)
#
# Then build with --build-arg BASE_IMAGE=IMAGE (Compose: PALIGEMMA_BASE_IMAGE=IMAGE). The host's CA
# bundle is copied in: it trusts whatever TLS-inspecting proxy stands between the host and PyPI.
set -euo pipefail

IMAGE=${1:-localhost/python-base:bookworm}
PODMAN=${PODMAN:-podman}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

[ "$(id -u)" = 0 ] || { echo "make-base-image: debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] \
    || { echo "make-base-image: install debootstrap (scripts/install-system-deps.sh --containers)" >&2; exit 1; }

root=$(mktemp -d -t python-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
started=$SECONDS
/usr/sbin/debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$root" "$MIRROR" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
fi
tar -C "$root" -c . | $PODMAN import -q - "$IMAGE" >/dev/null
echo "make-base-image: $IMAGE in $((SECONDS - started)) s"
