#!/bin/sh
# One command from a fresh Debian 12/13 machine (as root): the Debian packages, then a virtualenv
# with this project and its Python dependencies. Safe to rerun.
set -eu
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive
# fail2ban is here for the host tests of the extranet's jails (fail2ban-regex, fail2ban's own action code); a fresh
# install is left disabled, so that this machine never starts banning because of them.
had_fail2ban=$(dpkg-query -W -f '${Status}' fail2ban 2>/dev/null || true)
apt-get update -q
apt-get install -y -q --no-install-recommends \
    python3 python3-venv python3-pip \
    qemu-system-x86 qemu-utils \
    debootstrap sudo kpartx gdisk dosfstools e2fsprogs squashfs-tools util-linux \
    curl ca-certificates xz-utils openssh-client procps \
    skopeo docker-registry busybox-static \
    fail2ban nftables iproute2
case "$had_fail2ban" in
    *"ok installed"*) ;;
    *) systemctl disable --now fail2ban.service 2>/dev/null || true ;;
esac
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[dev]'
echo "ready: .venv/bin/homelab --help  (or: . .venv/bin/activate)"
