#!/usr/bin/env bash
# Verify README.md "Install as a service" on a real systemd (Debian 12 in a qemu VM).
# Run as root on a Debian machine: bash systemd/vm-check/run.sh
#
#   HL7B_VM_DIR      work dir (rootfs, disk image, share, logs)      default /tmp/hl7bridge-vm
#   HL7B_REV         git revision copied into the VM                  default HEAD
#   HL7B_MIRROR      Debian mirror                                    default http://deb.debian.org/debian
#   HL7B_ACCEL       kvm | tcg                                        default: kvm if usable, else tcg
#   HL7B_VM_TIMEOUT  seconds before the VM is killed                  default 3600
#   HL7B_REBUILD=1   debootstrap again even if the cached rootfs exists
#
# The debootstrapped rootfs is cached in $HL7B_VM_DIR/rootfs; the disk image is made anew from it
# on every run, so each run starts from a fresh Debian. Inside, check.sh runs at boot
# (vm-check.service), writes its transcript and results to a 9p share and powers the VM off.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(git -C "$HERE" rev-parse --show-toplevel)
WORK=${HL7B_VM_DIR:-/tmp/hl7bridge-vm}
REV=${HL7B_REV:-HEAD}
MIRROR=${HL7B_MIRROR:-http://deb.debian.org/debian}
VM_TIMEOUT=${HL7B_VM_TIMEOUT:-3600}
ROOTFS=$WORK/rootfs
SHARE=$WORK/share
START=$(date +%s)

log() { printf '[vm-check %4ss] %s\n' "$(($(date +%s) - START))" "$*"; }
die() { log "ERROR: $*"; exit 2; }

[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap, chroot, mkfs)"
mkdir -p "$WORK"

# --- host tools ----------------------------------------------------------------------------------
missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- 1. rootfs: Debian 12 with systemd, a kernel, networkd, and the check unit ----------------------
if [ "${HL7B_REBUILD:-0}" = 1 ] || [ ! -e "$ROOTFS/.vm-check-done" ]; then
    log "debootstrap bookworm into $ROOTFS (a few minutes)"
    rm -rf "$ROOTFS"
    debootstrap --include=linux-image-amd64,systemd-sysv,udev,dbus,ca-certificates,initramfs-tools \
        bookworm "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
        die "debootstrap failed, see $WORK/debootstrap.log"

    echo hl7bridge-vm >"$ROOTFS/etc/hostname"
    printf '127.0.0.1 localhost\n127.0.1.1 hl7bridge-vm\n' >"$ROOTFS/etc/hosts"
    printf 'nameserver 10.0.2.3\n' >"$ROOTFS/etc/resolv.conf" # qemu user-mode networking's DNS
    printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' >"$ROOTFS/etc/fstab"
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$MIRROR" "$MIRROR" >"$ROOTFS/etc/apt/sources.list"
    mkdir -p "$ROOTFS/mnt/host" "$ROOTFS/var/log/journal"
    printf '[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n' >"$ROOTFS/etc/systemd/network/10-dhcp.network"
    cat >"$ROOTFS/etc/systemd/system/vm-check.service" <<'EOF'
[Unit]
Description=hl7bridge install check (systemd/vm-check/check.sh from the host share)
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
ExecStartPre=/bin/mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 hostshare /mnt/host
ExecStart=/bin/bash /mnt/host/check.sh
ExecStopPost=/bin/sync
ExecStopPost=/bin/systemctl --no-block poweroff
StandardOutput=journal+console
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
EOF
    chroot "$ROOTFS" systemctl enable systemd-networkd systemd-networkd-wait-online vm-check.service
    chroot "$ROOTFS" passwd -d root >/dev/null # console login for debugging (the VM has no open ports)
    touch "$ROOTFS/.vm-check-done"
else
    log "reusing cached rootfs $ROOTFS (HL7B_REBUILD=1 to redo)"
fi

# --- 2. the share: the repository, a wheelhouse for Python 3.11, the check script ----------------
log "preparing $SHARE (repository at $REV, wheelhouse)"
rm -rf "$SHARE"
mkdir -p "$SHARE/repo" "$SHARE/wheelhouse" "$SHARE/out"
git -C "$REPO" archive "$REV" | tar -x -C "$SHARE/repo"
git -C "$REPO" rev-parse "$REV" >"$SHARE/out/revision"
cp "$HERE/check.sh" "$SHARE/check.sh"
# Debian 12's python3 is 3.11, like the VM's: wheels built here fit. The VM installs with
# PIP_NO_INDEX + PIP_FIND_LINKS (it cannot verify PyPI's TLS behind an intercepting proxy).
[ -x "$WORK/hostvenv/bin/pip" ] || /usr/bin/python3 -m venv "$WORK/hostvenv"
"$WORK/hostvenv/bin/pip" wheel -q -w "$SHARE/wheelhouse" "$SHARE/repo" 'setuptools>=68' wheel \
    >"$WORK/wheelhouse.log" 2>&1 || die "pip wheel failed, see $WORK/wheelhouse.log"
rm -f "$SHARE"/wheelhouse/hl7bridge-*.whl # the VM installs the repository itself, as the README says

# --- 3. disk image ---------------------------------------------------------------------------------
log "building $WORK/root.img"
cp -L "$ROOTFS/vmlinuz" "$WORK/vmlinuz" # the kernel package keeps these links current
cp -L "$ROOTFS/initrd.img" "$WORK/initrd.img"
rm -f "$WORK/root.img"
truncate -s 6G "$WORK/root.img"
mkfs.ext4 -q -F -L root -d "$ROOTFS" "$WORK/root.img"

# --- 4. boot -----------------------------------------------------------------------------------------
accel=${HL7B_ACCEL:-}
if [ -z "$accel" ]; then
    # /dev/kvm may exist and still not run a guest (seen: "failed to set MSR 0x10a", or a silent
    # hang): boot the kernel without a root disk and see whether it gets to its panic.
    accel=tcg
    rm -f "$WORK/kvm-probe.log"
    if [ -w /dev/kvm ]; then
        (timeout 30 qemu-system-x86_64 -accel kvm -M q35 -cpu host -m 512 -display none -monitor none \
            -no-reboot -serial "file:$WORK/kvm-probe.log" -kernel "$WORK/vmlinuz" \
            -append "console=ttyS0 panic=-1" || true) >/dev/null 2>&1 # "|| true": qemu may abort (set -e)
        grep -q 'Kernel panic' "$WORK/kvm-probe.log" 2>/dev/null && accel=kvm
    fi
fi
cpu=max
[ "$accel" = kvm ] && cpu=host
log "booting the VM (accel=$accel); serial console in $WORK/serial.log"
: >"$WORK/serial.log"
qemu_rc=0
timeout "$VM_TIMEOUT" qemu-system-x86_64 -accel "$accel" -M q35 -cpu "$cpu" -smp 2 -m 2048 \
    -display none -monitor none -no-reboot -serial "file:$WORK/serial.log" \
    -kernel "$WORK/vmlinuz" -initrd "$WORK/initrd.img" \
    -append "root=/dev/vda rw console=ttyS0 panic=-1" \
    -drive "file=$WORK/root.img,format=raw,if=virtio" \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0 \
    -virtfs "local,path=$SHARE,mount_tag=hostshare,security_model=none,id=hostshare" &
qemu=$!
tail -n +1 -F --pid="$qemu" "$WORK/serial.log" 2>/dev/null | grep --line-buffered -E '^(====|PASS|FAIL|INFO)' &
tailer=$!
wait "$qemu" || qemu_rc=$?
wait "$tailer" 2>/dev/null || true
log "VM exited (status $qemu_rc)"

# --- 5. report ---------------------------------------------------------------------------------------
OUT=$SHARE/out
cp "$OUT"/* "$WORK/" 2>/dev/null || true
echo
echo "==== hl7bridge install check ($(cat "$OUT/revision"), accel=$accel, $(($(date +%s) - START)) s) ===="
if [ ! -e "$OUT/done" ]; then
    echo "FAIL  the check did not finish: see $WORK/serial.log and $WORK/transcript.txt"
    tail -n 30 "$WORK/serial.log"
    exit 1
fi
cat "$OUT/results.txt"
if [ -s "$OUT/issues.txt" ]; then
    echo
    echo "README / unit problems found (workarounds applied in the VM):"
    cat "$OUT/issues.txt"
fi
echo
echo "transcript: $WORK/transcript.txt"
fails=$(grep -c '^FAIL' "$OUT/results.txt" || true)
if [ "$fails" -gt 0 ] || [ -s "$OUT/issues.txt" ]; then
    echo "RESULT: FAIL ($fails failed checks, $(grep -c . "$OUT/issues.txt" || true) README problems)"
    exit 1
fi
echo "RESULT: PASS"
