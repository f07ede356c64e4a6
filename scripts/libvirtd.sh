#!/usr/bin/env bash
# Makes this machine's libvirt daemon answer on qemu:///system, for nodes
# placed with libvirt (and their tests): starts virtlogd and libvirtd when
# they are not running (a host without systemd, such as a CI container,
# starts neither), and waits until the daemon answers. Safe to run again.
set -euo pipefail
say() { printf '[libvirtd] %s\n' "$*" >&2; }
command -v libvirtd >/dev/null || { say "no libvirtd: bash scripts/setup.sh installs it"; exit 1; }
# libvirt checks that its QEMU user can open /dev/kvm; where udev has not
# given it to the kvm group (0600 root), libvirt finds its cached QEMU
# capabilities stale on every start and probes QEMU again (~45 s a domain).
if [ "$(id -u)" = 0 ] && [ -c /dev/kvm ] && [ "$(stat -c %G /dev/kvm)" = root ] && getent group kvm >/dev/null; then
    say "giving /dev/kvm to group kvm (mode 0660), as udev's rule does"
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi
if [ -d /run/systemd/system ]; then
    systemctl start libvirtd.socket virtlogd.socket 2>/dev/null || systemctl start libvirtd
else
    [ "$(id -u)" = 0 ] || { say "qemu:///system needs root to start its daemon: run as root"; exit 1; }
    pgrep -x virtlogd >/dev/null || { say "starting virtlogd"; virtlogd -d; }
    pgrep -x libvirtd >/dev/null || { say "starting libvirtd"; libvirtd -d; }
fi
for _ in $(seq 1 100); do
    virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
    sleep 0.1
done
say "libvirtd does not answer on qemu:///system after 10 s; its log is in /var/log/libvirt"
exit 1
