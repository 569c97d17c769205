#!/bin/sh
# One command from a fresh Debian 12/13 machine (as root): the Debian packages, then a virtualenv
# with this project and its Python dependencies. Safe to rerun.
set -eu
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive
# fail2ban is here for the host tests of the extranet's jails (fail2ban-regex, fail2ban's own action code); a fresh
# install is left disabled, so that this machine never starts banning because of them. restic and PostgreSQL
# (the backup script's host test), openvpn and openssl (the VPN's host test with a throwaway PKI) are
# there for host tests too.
had_fail2ban=$(dpkg-query -W -f '${Status}' fail2ban 2>/dev/null || true)
apt-get update -q
apt-get install -y -q --no-install-recommends \
    python3 python3-venv python3-pip \
    qemu-system-x86 qemu-utils \
    debootstrap sudo kpartx gdisk dosfstools e2fsprogs squashfs-tools util-linux \
    curl ca-certificates xz-utils openssh-client procps \
    skopeo docker-registry busybox-static \
    fail2ban nftables iproute2 restic postgresql openvpn openssl
case "$had_fail2ban" in
    *"ok installed"*) ;;
    *) systemctl disable --now fail2ban.service 2>/dev/null || true ;;
esac
# The intranet's backup script needs restic >= 0.17 (--stdin-from-command) and its host test runs it for real;
# Debian 12 has 0.14. There, take Debian 13's restic (a Go program needing only libc6 >= 2.34), fetched by apt
# through a sources list of its own: the machine's apt configuration is left as it is.
if ! restic backup --help 2>/dev/null | grep -q -- --stdin-from-command; then
    trixie=$(mktemp -d)
    echo "deb http://deb.debian.org/debian trixie main" > "$trixie/sources.list"
    mkdir -p "$trixie/parts" "$trixie/lists/partial" "$trixie/cache/archives/partial"
    set -- -o "Dir::Etc::SourceList=$trixie/sources.list" -o "Dir::Etc::SourceParts=$trixie/parts" \
        -o "Dir::State::Lists=$trixie/lists" -o "Dir::Cache=$trixie/cache" -o APT::Sandbox::User=root
    apt-get "$@" update -q
    (cd "$trixie" && apt-get "$@" download restic)
    dpkg -i "$trixie"/restic_*.deb
    rm -rf "$trixie"
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[dev]'
echo "ready: .venv/bin/homelab --help  (or: . .venv/bin/activate)"
