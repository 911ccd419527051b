#!/bin/busybox sh
# qvm guest init (PID 1 in the initramfs). It owns nothing secret and trusts only the host channel.
#
#   /dev/vda  the image's root filesystem, mounted read-only (the VMM also attaches it read-only)
#   /dev/vdb  this instance's scratch disk (ext4): the upper layer of an overlayfs over the root
#   the host channel, chosen by the kernel argument qvm.channel=:
#       (default)  virtio-serial port named qvm.0 (QEMU)
#       hvc0       a virtio console (Cloud Hypervisor), dedicated to the channel
#       ttyS0      the serial port (Firecracker), shared with the kernel console until init silences it
#   line protocol with the node-agent:
#       guest -> host  READY | OUT <base64 line> | EXIT <code> | ERROR <text>
#       host -> guest  RUN <base64 of a /bin/sh -c script>
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp /mnt/lower /mnt/scratch /mnt/root
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/order); do insmod "/lib/modules/$m.ko" 2>/dev/null; done

fail() { [ -n "$PORT" ] && printf 'ERROR %s\n' "$*" >&3; echo "qvm-init: $*" >&2; sync; reboot -f; }

CHANNEL=
NET=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    qvm.channel=*) CHANNEL=${arg#qvm.channel=} ;;
    qvm.net=*) NET=${arg#qvm.net=} ;;  # address/prefix,gateway: the node allows this job some egress
  esac
done
PORT=
i=0
while [ -z "$PORT" ] && [ $i -lt 600 ]; do
  case "$CHANNEL" in
    hvc0|ttyS0) [ -c "/dev/$CHANNEL" ] && PORT=/dev/$CHANNEL ;;
    *)
      for p in /sys/class/virtio-ports/*; do
        [ -e "$p/name" ] && [ "$(cat "$p/name")" = qvm.0 ] && PORT=/dev/${p##*/}
      done ;;
  esac
  [ -n "$PORT" ] && [ -e "$PORT" ] || { PORT=; i=$((i + 1)); sleep 0.05; }
done
[ -n "$PORT" ] || fail "no host channel"
if [ "$CHANNEL" = ttyS0 ]; then
  echo 0 > /proc/sys/kernel/printk   # the serial is the channel now: no kernel messages on it
  exec 2>/dev/null
fi
exec 3<>"$PORT"
case "$CHANNEL" in hvc0|ttyS0) stty -F "$PORT" raw -echo 2>/dev/null ;; esac

i=0
while [ ! -b /dev/vda ] || [ ! -b /dev/vdb ]; do
  i=$((i + 1)); [ $i -gt 600 ] && fail "root or scratch disk missing"; sleep 0.05
done
mount -o ro /dev/vda /mnt/lower || fail "cannot mount the root image"
mount -t ext4 /dev/vdb /mnt/scratch || fail "cannot mount the scratch disk"
mkdir -p /mnt/scratch/upper /mnt/scratch/work
mount -t overlay overlay -o lowerdir=/mnt/lower,upperdir=/mnt/scratch/upper,workdir=/mnt/scratch/work /mnt/root \
  || fail "cannot mount the overlay"
mkdir -p /mnt/root/proc /mnt/root/sys /mnt/root/dev /mnt/root/tmp
mount -t proc proc /mnt/root/proc
mount -t sysfs sysfs /mnt/root/sys
mount -t devtmpfs devtmpfs /mnt/root/dev

if [ -n "$NET" ]; then
  ip link set eth0 up && ip addr add "${NET%,*}" dev eth0 && ip route add default via "${NET#*,}" \
    || fail "cannot configure the network"
fi

printf 'READY\n' >&3
while IFS= read -r line <&3; do
  case "$line" in
    RUN\ *) break ;;
    *) sleep 0.05 ;;  # EOF while no host is connected: keep waiting
  esac
done
SCRIPT=$(printf '%s' "${line#RUN }" | base64 -d) || fail "bad RUN frame"
( chroot /mnt/root /bin/sh -c "$SCRIPT" </dev/null 2>&1; echo "$?" > /tmp/rc ) | \
  while IFS= read -r out || [ -n "$out" ]; do
    printf 'OUT %s\n' "$(printf '%s\n' "$out" | base64 -w 0)" >&3
  done
printf 'EXIT %s\n' "$(cat /tmp/rc 2>/dev/null || echo 255)" >&3
sync
umount /mnt/root/dev /mnt/root/sys /mnt/root/proc /mnt/root /mnt/scratch /mnt/lower 2>/dev/null
reboot -f
