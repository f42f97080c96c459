#!/bin/sh
# /init of the AMD-V lane's L1 machine (pykvm/lane): Debian's kernel under QEMU TCG with SVM.
#
# Built into l1.cpio by pykvm.assets.l1 with busybox-static and the kernel modules named in
# /etc/pykvm-modules (one per line, dependencies first). What it does:
#   1. loads kvm and kvm-amd (a real AMD-V /dev/kvm on QEMU's emulated SVM) and 9p over virtio;
#   2. mounts the host's / read-only at /host, and the run's writable share at the same path
#      inside it as on the host (pykvm.share=PATH on the kernel command line);
#   3. gives that tree what a system needs (proc, sys, devtmpfs, devpts, tmpfs on /run,
#      /dev/shm and /tmp) and runs PATH/job.sh in a chroot of it, output on ttyS1;
#   4. writes the job's exit status to PATH/status (and says it on the console, ttyS0), and
#      powers the machine off, which ends QEMU.
# Anything that goes wrong before the job runs ends the same way with status 125.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

say() { echo "pykvm-lane: $*"; }

finish() {
    status=$1
    [ -n "$share_mounted" ] && echo "$status" > /share/status
    say "exit status $status"
    sync
    poweroff -f
    sleep 60   # poweroff -f does not return; if it ever does, the host's timeout ends the run
}

fail() {
    say "error: $*"
    finish 125
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

share=
share_mounted=
exports=   # "TAG=PATH ..." for the read-only shares of a checkout or cache under /tmp or /run
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    pykvm.share=*) share=${arg#pykvm.share=} ;;
    pykvm.ro[0-9]*=*) tag=${arg%%=*}; exports="$exports pykvm-${tag#pykvm.}=${arg#*=}" ;;
    esac
done
[ -n "$share" ] || fail "no pykvm.share=PATH on the kernel command line"

# Modules by file, in the order the asset builder worked out from their depends= fields.
while read -r module; do
    insmod "/lib/modules/$module.ko" || fail "insmod $module failed"
done < /etc/pykvm-modules
[ -c /dev/kvm ] || fail "/dev/kvm did not appear: is SVM in QEMU's -cpu (e.g. EPYC,+svm,+npt)?"
say "kvm_amd loaded: npt=$(cat /sys/module/kvm_amd/parameters/npt) nested=$(cat /sys/module/kvm_amd/parameters/nested)"

# 9p (the Plan 9 file protocol, Linux dialect 9p2000.L) over virtio-pci, served by QEMU's -virtfs.
# cache=loose lets L1 keep what it read of the read-only host tree; the share keeps the default
# (no caching), so every write reaches the host file at once.
opts=trans=virtio,version=9p2000.L,msize=512000
mkdir -p /host /share
mount -t 9p -o "$opts,ro,cache=loose" pykvm-root /host || fail "cannot mount the host's / over 9p"
mount -t 9p -o "$opts" pykvm-share /share || fail "cannot mount the writable share over 9p"
share_mounted=1

mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs tmpfs /host/dev/shm
mount -t tmpfs tmpfs /host/run
mount -t tmpfs tmpfs /host/tmp
# The share appears at its host path (in the tmpfs above if it lives under /tmp on the host).
mkdir -p "/host$share" 2>/dev/null
mount --bind /share "/host$share" || fail "cannot mount the share at $share"
# The checkout or asset cache when they live under the /tmp or /run just mounted fresh: their own
# read-only shares, at their own paths.
for export in $exports; do
    path=${export#*=}
    mkdir -p "/host$path" 2>/dev/null
    mount -t 9p -o "$opts,ro,cache=loose" "${export%%=*}" "/host$path" || fail "cannot mount $path over 9p"
done
ip link set lo up

# The job's output goes to the second serial port, which the host streams and keeps; the kernel
# and this script keep ttyS0. raw: no \n -> \r\n translation on the way out.
stty -F /dev/ttyS1 raw -echo
say "running $share/job.sh"
chroot /host /bin/sh "$share/job.sh" < /dev/null > /dev/ttyS1 2>&1
finish $?
