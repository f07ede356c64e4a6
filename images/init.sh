#!/bin/busybox sh
# disagg-harness guest init. Mounts the host's root read-only over 9p, shows
# the harness's run directory at /run/dh/run, and runs one executable from it
# in a chroot with the host's own programs (the project's own Python, so a
# code change needs no image rebuild). Kernel parameters (and, after a
# snapshot point, the per-start line that dh-fresh prints):
#   dh.mode=bare      power off at once (the boot benchmark's floor)
#   dh.script=NAME    run RUN_DIR/NAME (an executable: a shebang script), then
#                     report "DH-EXIT <status>"
#   dh.rundir=PATH    the run directory's path on the host
#   dh.keep=P1,P2     host paths under /tmp or /run the guest must still see
#                     (the project, its venv, the caller's directory)
#   dh.disk=1         load ext4, mount /dev/vda at /run/dh/disk
#   dh.snap=1         a snapshot point before 9p is mounted (a mounted export
#                     blocks migration): print DH-SNAP, wait for the host's
#                     per-start line on the dh.go port (harness boot)
#   dh.root=image     the root is the read-only image on the disk with serial
#                     dhroot; its /.dh/agent starts and waits for its spec (the
#                     snapshot point of a cluster node); once the host's line
#                     comes, the host root is mounted at /run/dh/host for the
#                     programs the node runs, and the disk at /run/dh/disk
/bin/busybox mkdir -p /proc /sys /dev /bin /newroot /params
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev

arg() {  # the last word wins: the per-start line comes after the kernel's
    v=""
    for w in $(cat /proc/cmdline /params/line 2>/dev/null); do
        case "$w" in "$1"=*) v="${w#*=}" ;; esac
    done
    echo "$v"
}
finish() {
    echo "DH-EXIT $1" > /dev/console
    sync
    poweroff -f
}
fail() {
    echo "dh-init: $1" > /dev/console
    finish 125
}

[ "$(arg dh.mode)" = bare ] && poweroff -f

load() {
    for m in $(cat "$1"); do
        [ -e "/sys/module/${m%.ko}" ] && continue  # the root's and the disk's lists share some
        insmod "/lib/modules/$m" || echo "dh-init: insmod $m failed" > /dev/console
    done
}
load /etc/modules.load
[ "$(arg dh.root)" = image ] && load /etc/modules.root
DISK=$(arg dh.disk)  # once: a restored guest pays for every process it starts
[ "$DISK" = 1 ] && load /etc/modules.disk

fresh() {  # blocks until the host, having restored this guest, sends its line
    port=/dev/vport0p1
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name" 2>/dev/null)" = dh.go ] && port="/dev/$(basename "$p")"
    done
    /bin/dh-fresh "$port" > /params/line || fail "cannot make the restored guest fresh"
}

# prepare ROOT: what a root needs around it. The run directory and the kept
# paths usually live under the host's /tmp or /run, which ROOT's own tmpfs
# mounts would hide: hold them aside, then move them in.
prepare() {
    root=$1
    rundir=$(arg dh.rundir)
    mkdir -p /hold/run
    if [ -n "$rundir" ]; then
        mount --bind "$root$rundir" /hold/run \
            || fail "the run directory $rundir is not visible"
    fi
    i=0
    for p in $(arg dh.keep | tr , ' '); do
        mkdir -p "/hold/$i"
        mount --bind "$root$p" "/hold/$i" && echo "$p" > "/hold/$i.path"
        i=$((i + 1))
    done
    mount -t tmpfs -o mode=1777 tmp "$root/tmp"
    mount -t tmpfs -o mode=755 run "$root/run"
    mkdir -p "$root/run/dh/run" "$root/run/dh/disk" "$root/run/dh/modules" "$root/run/dh/host"
    for m in $(cat /etc/modules.lazy); do  # for the guest to load when it needs them
        cp "/lib/modules/$m" "$root/run/dh/modules/" && echo "$m" >> "$root/run/dh/modules/order"
    done
    [ -n "$rundir" ] && mount --move /hold/run "$root/run/dh/run"
    for f in /hold/*.path; do
        [ -e "$f" ] || continue
        p=$(cat "$f")
        mkdir -p "$root$p"
        mount --move "${f%.path}" "$root$p"
        rm "$f"
    done
    mount -t devtmpfs dev "$root/dev"
    mount -t proc proc "$root/proc"
    mount -t sysfs sys "$root/sys"
    mkdir -p "$root/dev/virtio-ports" "$root/dev/shm"
    for p in /sys/class/virtio-ports/*; do
        [ -e "$p/name" ] && ln -sf "../$(basename "$p")" "$root/dev/virtio-ports/$(cat "$p/name")"
    done
}
hostroot() {
    mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot "$1" \
        || fail "cannot mount the host root over 9p"
}
disk() {
    [ "$DISK" = 1 ] || return 0
    blockdev --flushbufs /dev/vda  # blocks cached before a snapshot are another disk's
    # noinit_itable: no kernel thread zeroing the inode tables mkfs left
    # lazy, beside the node's own work on the guest's one CPU.
    mount -t ext4 -o noinit_itable /dev/vda "$1" || fail "cannot mount /dev/vda"
}

if [ "$(arg dh.root)" = image ]; then
    dev=""
    for b in /sys/block/vd*; do
        [ "$(cat "$b/serial" 2>/dev/null)" = dhroot ] && dev="/dev/$(basename "$b")"
    done
    [ -n "$dev" ] || fail "no root image disk (serial dhroot)"
    mount -t erofs -o ro "$dev" /newroot || fail "cannot mount the root image $dev"
    prepare /newroot
    chroot /newroot /.dh/agent < /dev/null > /dev/console 2>&1 &
    agent=$!
    # The host root serves only the programs the node runs, and mounting it
    # costs a TCG guest ~0.3 s of its one CPU: done when the agent first asks
    # (a line on this FIFO, held open so that asking never blocks), not
    # while the agent starts. Made before the snapshot point, as is all
    # that can be: a restored guest pays for every process it starts.
    mkfifo /newroot/run/dh/host.want
    exec 3<> /newroot/run/dh/host.want
    (
        read -r _ <&3
        hostroot /newroot/run/dh/host
        prepare /newroot/run/dh/host
        [ "$DISK" = 1 ] && mount --bind /newroot/run/dh/disk /newroot/run/dh/host/run/dh/disk
        : > /newroot/run/dh/host.ready  # the agent runs programs once this is here
    ) &
    fresh
    disk /newroot/run/dh/disk
    : > /newroot/run/dh/fresh  # the agent goes on once this is here
    wait $agent
    rc=$?
    umount /newroot/run/dh/host/run/dh/disk /newroot/run/dh/disk 2>/dev/null
    finish $rc
fi

if [ "$(arg dh.snap)" = 1 ]; then
    echo "DH-SNAP" > /dev/console
    fresh
fi
hostroot /newroot
prepare /newroot
disk /newroot/run/dh/disk

out=/dev/console
err=/dev/console
[ -e /newroot/dev/virtio-ports/dh.out ] && out=/newroot/dev/virtio-ports/dh.out
[ -e /newroot/dev/virtio-ports/dh.err ] && err=/newroot/dev/virtio-ports/dh.err
echo "DH-RUN $(cut -d' ' -f1 /proc/uptime)" > /dev/console
chroot /newroot "/run/dh/run/$(arg dh.script)" < /dev/null > "$out" 2> "$err"
rc=$?
umount /newroot/run/dh/disk 2>/dev/null
finish $rc
