#!/bin/sh
# TEST/CI HOST ONLY: make the kpartx/dmsetup stand-ins in bin/ beside this file win on a kernel without
# device-mapper (none in /proc/misc). diskimage-builder runs them through sudo, whose
# secure_path ignores PATH, so the directory goes in front of secure_path in a sudoers drop-in.
# Does nothing on a machine that has device-mapper. Undo: rm /etc/sudoers.d/homelab-no-device-mapper
set -eu
bin=$(cd "$(dirname "$0")/bin" && pwd)
dropin=/etc/sudoers.d/homelab-no-device-mapper
# /dev/mapper/control can exist without kernel support (package scripts create it): ask the kernel.
[ -e /sys/module/dm_mod ] || modprobe dm_mod 2>/dev/null || true
if grep -qw device-mapper /proc/misc; then
    echo "device-mapper present: no stand-ins needed"; rm -f "$dropin"; exit 0
fi
printf 'Defaults secure_path="%s:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"\n' "$bin" > "$dropin.tmp"
chmod 0440 "$dropin.tmp"
visudo -cf "$dropin.tmp" >/dev/null
mv "$dropin.tmp" "$dropin"
echo "no device-mapper: kpartx/dmsetup stand-ins from $bin are first on sudo's path"
