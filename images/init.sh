#!/bin/busybox sh
# disagg-harness guest init. Mounts the host's root read-only over 9p, shows
# the harness's run directory at /run/dh/run, and runs one executable from it
# in a chroot with the host's own programs (the project's own Python, so a
# code change needs no image rebuild). Kernel parameters:
#   dh.mode=bare      power off at once (the boot benchmark's floor)
#   dh.script=NAME    run RUN_DIR/NAME (an executable: a shebang script), then
#                     report "DH-EXIT <status>"
#   dh.rundir=PATH    the run directory's path on the host
#   dh.keep=P1,P2     host paths under /tmp or /run the guest must still see
#                     (the project, its venv, the caller's directory)
#   dh.disk=1         load ext4, mount /dev/vda at /run/dh/disk
/bin/busybox mkdir -p /proc /sys /dev /bin /newroot
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev

arg() {
    for w in $(cat /proc/cmdline); do
        case "$w" in "$1"=*) echo "${w#*=}" ;; esac
    done
}
finish() {
    echo "DH-EXIT $1" > /dev/console
    sync
    poweroff -f
}

[ "$(arg dh.mode)" = bare ] && poweroff -f

load() {
    for m in $(cat "$1"); do
        insmod "/lib/modules/$m" || echo "dh-init: insmod $m failed" > /dev/console
    done
}
load /etc/modules.load
[ "$(arg dh.disk)" = 1 ] && load /etc/modules.disk

mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /newroot \
    || { echo "dh-init: cannot mount the host root over 9p" > /dev/console; finish 125; }
# The run directory usually lives under the host's /tmp or /run, which the
# guest's own tmpfs mounts below would hide: hold it aside, then move it in.
mkdir -p /rundir
mount --bind "/newroot$(arg dh.rundir)" /rundir \
    || { echo "dh-init: the run directory $(arg dh.rundir) is not visible" > /dev/console; finish 125; }
i=0
for p in $(arg dh.keep | tr , ' '); do
    mkdir -p "/keep/$i"
    mount --bind "/newroot$p" "/keep/$i" && echo "$p" > "/keep/$i.path"
    i=$((i + 1))
done
mount -t tmpfs -o mode=1777 tmp /newroot/tmp
mount -t tmpfs -o mode=755 run /newroot/run
mkdir -p /newroot/run/dh/run /newroot/run/dh/disk /newroot/run/dh/modules
for m in $(cat /etc/modules.lazy); do  # for the guest to load when it needs them
    cp "/lib/modules/$m" /newroot/run/dh/modules/ && echo "$m" >> /newroot/run/dh/modules/order
done
mount --move /rundir /newroot/run/dh/run
for f in /keep/*.path; do
    [ -e "$f" ] || continue
    p=$(cat "$f")
    mkdir -p "/newroot$p"
    mount --move "${f%.path}" "/newroot$p"
done
mount -t devtmpfs dev /newroot/dev
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mkdir -p /newroot/dev/virtio-ports /newroot/dev/shm
for p in /sys/class/virtio-ports/*; do
    [ -e "$p/name" ] && ln -sf "../$(basename "$p")" "/newroot/dev/virtio-ports/$(cat "$p/name")"
done
if [ "$(arg dh.disk)" = 1 ]; then
    mount -t ext4 /dev/vda /newroot/run/dh/disk \
        || { echo "dh-init: cannot mount /dev/vda" > /dev/console; finish 125; }
fi

out=/dev/console
err=/dev/console
[ -e /newroot/dev/virtio-ports/dh.out ] && out=/newroot/dev/virtio-ports/dh.out
[ -e /newroot/dev/virtio-ports/dh.err ] && err=/newroot/dev/virtio-ports/dh.err
echo "DH-RUN $(cut -d' ' -f1 /proc/uptime)" > /dev/console
chroot /newroot "/run/dh/run/$(arg dh.script)" < /dev/null > "$out" 2> "$err"
rc=$?
umount /newroot/run/dh/disk 2>/dev/null
finish $rc
