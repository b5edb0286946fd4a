#!/usr/bin/env bash
# Makes the two base images of the offline build, without any container registry:
#   brokerfl-base:bookworm      Debian bookworm (minbase) + Python 3.11 in a venv on PATH
#   brokerfl-rabbitmq:bookworm  that base + Debian's rabbitmq-server (management enabled)
# The rootfs is made with debootstrap from the Debian mirror apt already uses, then
# `docker import`ed. Idempotent: an image that exists is left alone (seconds). Needs root,
# debootstrap and a running Docker engine. Names can be changed by environment:
#   BROKERFL_BASE_IMAGE, BROKERFL_BROKER_IMAGE, BROKERFL_DEBIAN_MIRROR.
# The host's locally added CA certificates (/usr/local/share/ca-certificates, e.g. of a
# TLS-intercepting proxy) are copied into the image so pip inside builds trusts them; they
# are copied at build time only and never belong in the repository.
set -euo pipefail

BASE_IMAGE=${BROKERFL_BASE_IMAGE:-brokerfl-base:bookworm}
BROKER_IMAGE=${BROKERFL_BROKER_IMAGE:-brokerfl-rabbitmq:bookworm}
SUITE=bookworm
HERE=$(cd "$(dirname "$0")" && pwd)

debian_mirror() {
  # The first Debian archive URI in apt's sources (deb822 or one-line format).
  if [ -n "${BROKERFL_DEBIAN_MIRROR:-}" ]; then echo "$BROKERFL_DEBIAN_MIRROR"; return; fi
  local uri
  uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {for (i = 2; i <= NF; i++) print $i}' | grep -E '/debian/?$' | head -n1 || true)
  if [ -z "$uri" ]; then
    uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; break}}' | grep -E '/debian/?$' | head -n1 || true)
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  echo "$BASE_IMAGE exists"
else
  rootfs=$(mktemp -d /var/tmp/brokerfl-rootfs.XXXXXX)
  trap 'rm -rf "$rootfs"' EXIT
  mirror=$(debian_mirror)
  echo "debootstrap $SUITE from $mirror"
  debootstrap --variant=minbase --include=ca-certificates,python3,python3-venv "$SUITE" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
    || { tail -n 30 "$rootfs.log"; rm -f "$rootfs.log"; exit 1; }
  rm -f "$rootfs.log"
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
  fi
  chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
  # A venv, so `pip install` works as in python:3.11-slim (Debian's own Python refuses it).
  chroot "$rootfs" python3 -m venv /opt/venv
  chroot "$rootfs" apt-get clean
  rm -rf "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["bash"]' \
    - "$BASE_IMAGE" >/dev/null
  echo "made $BASE_IMAGE"
fi

if docker image inspect "$BROKER_IMAGE" >/dev/null 2>&1; then
  echo "$BROKER_IMAGE exists"
else
  # no build context needed: the Dockerfile comes on stdin
  docker build -q --build-arg BASE="$BASE_IMAGE" -t "$BROKER_IMAGE" - <"$HERE/rabbitmq.Dockerfile" >/dev/null
  echo "made $BROKER_IMAGE"
fi
