#!/usr/bin/env bash
# Installs the system tools that tests/deployment/, deploy/check.sh and the browser tests need, from
# Debian's packages. Idempotent: a tool already on PATH is left alone, and nothing runs apt when all are there.
#
#   scripts/install-system-deps.sh               kubectl (kustomize rendering), promtool, chromium(-driver),
#                                                podman (the binary podman-compose's `config` asks for;
#                                                nothing runs)
#   scripts/install-system-deps.sh --containers  also runc, debootstrap, curl (deploy/check.sh --build)
#
# kubectl: Debian bookworm has no `kubectl` package; its `kubernetes-client` (1.20) ships
# /usr/bin/kubectl with an embedded kustomize that renders deploy/kubernetes. A `kubectl` package
# (Kubernetes' or Google Cloud's apt repository, if configured) is preferred when apt offers one.
# promtool: only shipped in Debian's `prometheus` package; its daemon is kept from starting.
set -euo pipefail

CONTAINERS=0
for arg in "$@"; do
    case "$arg" in
        --containers) CONTAINERS=1 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "unknown option: $arg" >&2; exit 2 ;;
    esac
done

have() { command -v "$1" >/dev/null 2>&1; }
candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}'; }

packages=()
need_kubectl=0
have kubectl || need_kubectl=1
have promtool || packages+=(prometheus)
have podman || packages+=(podman)
have chromium || packages+=(chromium)
have chromedriver || packages+=(chromium-driver)
if [ "$CONTAINERS" = 1 ]; then
    have runc || [ -x /usr/sbin/runc ] || packages+=(runc)
    have debootstrap || [ -x /usr/sbin/debootstrap ] || packages+=(debootstrap)
    have curl || packages+=(curl ca-certificates)
fi
if [ "$need_kubectl" = 0 ] && [ ${#packages[@]} -eq 0 ]; then
    echo "install-system-deps: everything is installed"
    exit 0
fi

SUDO=()
if [ "$(id -u)" != 0 ]; then
    have sudo || { echo "install-system-deps: run as root (or install sudo)" >&2; exit 1; }
    SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq

if [ "$need_kubectl" = 1 ]; then
    for pkg in kubectl kubernetes-client; do
        version=$(candidate "$pkg")
        if [ -n "$version" ] && [ "$version" != "(none)" ]; then
            echo "install-system-deps: kubectl from package $pkg $version"
            packages+=("$pkg")
            break
        fi
    done
    case " ${packages[*]} " in
        *" kubectl "*|*" kubernetes-client "*) ;;
        *) echo "install-system-deps: apt offers neither kubectl nor kubernetes-client; install kubectl" \
                "from https://kubernetes.io/docs/tasks/tools/" >&2; exit 1 ;;
    esac
fi

# Installing `prometheus` would start (and on systemd hosts enable) its server; only promtool is
# wanted. A policy-rc.d that denies service starts keeps it down during the install.
policy=/usr/sbin/policy-rc.d
added_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
    "${SUDO[@]}" chmod 0755 "$policy"
    added_policy=1
fi
trap '[ "$added_policy" = 1 ] && "${SUDO[@]}" rm -f "$policy"' EXIT

echo "install-system-deps: apt-get install ${packages[*]}"
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}"

if [ -d /run/systemd/system ] && systemctl list-unit-files prometheus.service >/dev/null 2>&1; then
    "${SUDO[@]}" systemctl disable --now prometheus.service >/dev/null 2>&1 || true
fi
have kubectl && have promtool && have podman && echo "install-system-deps: done"
have kubectl && have promtool && have chromium && have chromedriver && echo "install-system-deps: done"
