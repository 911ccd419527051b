#!/bin/busybox sh
# qvm guest init (PID 1 in the initramfs). It writes nothing secret to disk and trusts only the host channel.
#
#   /dev/vda  the image's root filesystem, mounted read-only (the VMM also attaches it read-only)
#   /dev/vdb  this instance's scratch disk: plain dm-crypt under a key made here (never leaves the guest), ext4
#             inside, the upper layer of an overlayfs over the root
#   /dev/vdc  the instance's data volume, when it has one: formatted as LUKS2 and opened HERE, with the key
#             the host sends over the channel (the host only ever sees ciphertext), ext4 inside, mounted
#             at /data in the workload's root
#   the host channel, chosen by the kernel argument qvm.channel=:
#       (default)  virtio-serial port named qvm.0 (QEMU)
#       hvc0       a virtio console (Cloud Hypervisor), dedicated to the channel
#       ttyS0      the serial port (Firecracker), shared with the kernel console until init silences it
#   line protocol with the node-agent (services/node_agent/channel.py), one frame per line:
#       guest -> host  READY <stage>=<uptime s>... | VOLUME_OK <luks uuid> | SECRET_OK <name> | OUT <base64 line> | EXIT <code>
#                      | CVM_REPORT_OK <provider> <base64 report> <base64 aux blob, or -> | ERROR <text>
#       host -> guest  VOLUME <64 lowercase hex digits>  after READY, before RUN, once: the 32-byte data key
#                      SECRET <name> <base64>            after READY, before RUN: /run/secrets/<name>
#                      CVM_REPORT <128 lowercase hex>    after READY, before RUN: in a confidential VM, the
#                                                        CPU's signed report (SEV-SNP report / TDX quote) over
#                                                        these 64 bytes of REPORT_DATA, read through configfs-tsm
#                      RUN <base64 of a /bin/sh -c script>
#     Each VOLUME and SECRET frame gets one answer, its _OK or `ERROR <text>` (init then keeps waiting for
#     RUN; the host decides). The key is never echoed, written to a file or put on a command line: it goes
#     from a shell variable to cryptsetup through a pipe from the builtin printf, and is unset after.
#     Secrets go to a tmpfs (RAM only; mode 0700, files 0400), never to a disk.
#   After the workload: EXIT, then sync, unmount /data, close the LUKS mapping (its key leaves the guest
#   kernel), unmount the secrets tmpfs, power off.
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp /mnt/lower /mnt/scratch /mnt/root
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Boot stamps: the guest's uptime when each stage ended, sent with READY (the host's boot breakdown).
uptime_s() { read -r up _ </proc/uptime; echo "$up"; }
read -r up _ </proc/uptime
STAMPS="init=$up"
stamp() { read -r up _ </proc/uptime; STAMPS="$STAMPS $1=$up"; }  # no subshell: a fork costs under TCG
mkdir -p /run/cryptsetup  # cryptsetup's lock directory
# A distribution kernel's modules, in load order (a minimal qvm kernel has everything built in: no list).
[ -f /lib/modules/order ] && for m in $(cat /lib/modules/order); do insmod "/lib/modules/$m.ko" 2>/dev/null; done
stamp modules

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
stamp channel
if [ "$CHANNEL" = ttyS0 ]; then
  echo 0 > /proc/sys/kernel/printk   # the serial is the channel now: no kernel messages on it
  exec >/dev/null 2>&1               # nor anything a tool prints (cryptsetup warns on stdout)
fi
exec 3<>"$PORT"
case "$CHANNEL" in hvc0|ttyS0) stty -F "$PORT" raw -echo 2>/dev/null ;; esac

i=0
while [ ! -b /dev/vda ] || [ ! -b /dev/vdb ]; do
  i=$((i + 1)); [ $i -gt 600 ] && fail "root or scratch disk missing"; sleep 0.05
done
stamp disks
mount -o ro /dev/vda /mnt/lower || fail "cannot mount the root image"
# The host's cryptsetup and mke2fs, carried in the initramfs at their host paths (busybox's applets are links).
tool() {  # the path of $1, echoed (for $(tool x) where a subshell does not matter)
  for d in /usr/sbin /sbin /usr/bin /bin; do
    [ -f "$d/$1" ] && [ ! -L "$d/$1" ] && { echo "$d/$1"; return 0; }
  done
  return 1
}
tool_var() {  # the path of $1 into the variable $2, without a subshell (each fork costs under TCG)
  for d in /usr/sbin /sbin /usr/bin /bin; do
    [ -f "$d/$1" ] && [ ! -L "$d/$1" ] && { eval "$2=$d/$1"; return 0; }
  done
  return 1
}

# The scratch disk takes everything the workload writes outside /data (the overlay's upper layer). It is
# encrypted here with a key made in this guest's RAM (plain dm-crypt: no header, nothing to unlock later),
# so the host's file only ever holds ciphertext and the key dies with the guest's (scrubbed) memory.
tool_var cryptsetup CS && tool_var mke2fs MK && tool_var dmsetup DM || fail "cryptsetup, mke2fs or dmsetup missing"
# Plain dm-crypt needs no cryptsetup (whose OpenSSL start-up alone costs a third of a second under TCG): the
# mapping's table goes to dmsetup on its stdin, from the builtin printf, with 64 random bytes as the key.
read -r SECTORS </sys/block/vdb/size
SKEY=$(od -An -v -tx1 -N64 /dev/urandom)
SKEY=${SKEY//[!0-9a-f]/}
[ ${#SKEY} -eq 128 ] || fail "cannot draw the scratch key"
printf '0 %s crypt aes-xts-plain64 %s 0 /dev/vdb 0\n' "$SECTORS" "$SKEY" \
  | $DM create --noudevsync qvm-scratch >/dev/null 2>&1 || { SKEY=; fail "cannot open the scratch disk"; }
SKEY=
unset SKEY
SCRATCH=  # its node: devtmpfs made /dev/dm-N (no udev to make /dev/mapper/qvm-scratch)
for d in /sys/block/dm-*; do
  read -r n <"$d/dm/name" 2>/dev/null && [ "$n" = qvm-scratch ] && SCRATCH=/dev/${d##*/}
done
[ -b "$SCRATCH" ] || fail "the scratch mapping has no device node"
stamp scratch
$MK -q -t ext4 -O ^has_journal,^resize_inode -E lazy_itable_init=1,nodiscard -m 0 -L qvm-scratch \
  "$SCRATCH" >/dev/null 2>&1 || fail "cannot format the scratch disk"
stamp mkfs
mount -t ext4 "$SCRATCH" /mnt/scratch || fail "cannot mount the scratch disk"
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
stamp overlay

VOLUME=   # the LUKS UUID, once the volume is open
SECRETS=  # set once the secrets tmpfs is mounted
verror() { KEY=; printf 'ERROR volume: %s\n' "$*" >&3; echo "qvm-init: volume: $*" >&2; }
cs_err() { tail -c 200 /tmp/vol.err 2>/dev/null | tr '\n' ' '; }

open_volume() {  # the key is in $KEY: 64 hex digits, used as they are as the LUKS2 key file
  [ -z "$VOLUME" ] || { verror "already open"; return; }
  case "$KEY" in *[!0-9a-f]*) verror "the key is not lowercase hex"; return ;; esac
  [ ${#KEY} -eq 64 ] || { verror "the key is not 64 hex digits"; return; }
  cs=$(tool cryptsetup) && mk=$(tool mke2fs) || { verror "cryptsetup or mke2fs missing from the initramfs"; return; }
  i=0
  while [ ! -b /dev/vdc ]; do
    i=$((i + 1)); [ $i -gt 100 ] && { verror "no volume disk (/dev/vdc)"; return; }; sleep 0.05
  done
  t0=$(uptime_s)
  # The key is 32 random bytes (256 bits of entropy): a slow passphrase KDF adds nothing against guessing
  # it, so PBKDF2 with the minimum iterations (argon2id costs ~10 s and 64 MiB per call under TCG). The
  # small metadata and keyslot areas put the data at 2 MiB instead of 16 MiB.
  printf '%s' "$KEY" | $cs luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
      --luks2-metadata-size 16k --luks2-keyslots-size 1m --key-file - --keyfile-size 64 /dev/vdc >/tmp/vol.err 2>&1 \
    || { verror "luksFormat failed: $(cs_err)"; return; }
  t1=$(uptime_s)
  printf '%s' "$KEY" | $cs open --type luks2 --key-file - --keyfile-size 64 /dev/vdc qvm-data >/tmp/vol.err 2>&1 \
    || { verror "open failed: $(cs_err)"; return; }
  KEY=
  unset KEY
  t2=$(uptime_s)
  $mk -q -t ext4 -L qvm-data /dev/mapper/qvm-data >/tmp/vol.err 2>&1 \
    || { $cs close qvm-data >/dev/null 2>&1; verror "mkfs.ext4 failed: $(cs_err)"; return; }
  t3=$(uptime_s)
  mkdir -p /mnt/root/data && mount -t ext4 -o nosuid,nodev /dev/mapper/qvm-data /mnt/root/data >/tmp/vol.err 2>&1 \
    || { $cs close qvm-data >/dev/null 2>&1; verror "mount failed: $(cs_err)"; return; }
  uuid=$($cs luksUUID /dev/vdc 2>/dev/null)
  VOLUME=${uuid:-unknown}
  echo "qvm-init: volume luksFormat $t0-$t1 open -$t2 mkfs -$t3 mounted -$(uptime_s) (guest uptime, s)" >&2
  printf 'VOLUME_OK %s\n' "$uuid" >&3
}

close_volume() {
  [ -n "$VOLUME" ] || return 0
  umount /mnt/root/data && $cs close qvm-data >/dev/null 2>&1 && VOLUME= && return 0
  echo "qvm-init: the volume did not close" >&2
}

serror() { SDATA=; printf 'ERROR secret: %s\n' "$*" >&3; }

put_secret() {  # $SNAME, $SDATA (base64)
  case "$SNAME" in ''|.*|*[!A-Za-z0-9._-]*) serror "bad name"; return ;; esac
  [ ${#SNAME} -le 64 ] || { serror "bad name"; return; }
  case "$SDATA" in *[!A-Za-z0-9+/=]*) serror "$SNAME: content is not base64"; return ;; esac
  if [ -z "$SECRETS" ]; then
    mkdir -p /mnt/root/run/secrets \
      && mount -t tmpfs -o mode=0700,size=1m,nosuid,nodev,noexec qvm-secrets /mnt/root/run/secrets \
      || { serror "cannot mount the secrets tmpfs"; return; }
    SECRETS=1
  fi
  f=/mnt/root/run/secrets/$SNAME
  [ ! -e "$f" ] || { serror "$SNAME: already delivered"; return; }
  if ! (umask 0377 && printf '%s' "$SDATA" | base64 -d >"$f") 2>/dev/null; then
    rm -f "$f"; serror "$SNAME: cannot write it"; return
  fi
  SDATA=
  printf 'SECRET_OK %s\n' "$SNAME" >&3
}

rerror() { printf 'ERROR cvm: %s\n' "$*" >&3; }

cvm_report() {  # $RD: 128 hex digits of REPORT_DATA (the challenge nonce bound to the instance key)
  case "$RD" in *[!0-9a-f]*) rerror "report data is not lowercase hex"; return ;; esac
  [ ${#RD} -eq 128 ] || { rerror "report data is not 64 bytes"; return; }
  tsm=/sys/kernel/config/tsm/report
  [ -d "$tsm" ] || mount -t configfs configfs /sys/kernel/config 2>/dev/null
  [ -d "$tsm" ] || { rerror "no configfs-tsm: not a confidential VM, or a guest kernel older than 6.7"; return; }
  d=$tsm/qvm$$
  mkdir "$d" 2>/dev/null || { rerror "cannot create a report entry"; return; }
  # privlevel stays 0 (VMPL 0 on SEV-SNP); the kernel asks the firmware when outblob is read
  printf "$(printf '%s' "$RD" | sed 's/../\\x&/g')" > "$d/inblob" || { rmdir "$d"; rerror "inblob refused"; return; }
  provider=$(cat "$d/provider" 2>/dev/null)
  out=$(base64 -w 0 < "$d/outblob" 2>/dev/null)
  aux=$(base64 -w 0 < "$d/auxblob" 2>/dev/null)
  rmdir "$d" 2>/dev/null
  [ -n "$out" ] || { rerror "the firmware returned no report (${provider:-no provider})"; return; }
  printf 'CVM_REPORT_OK %s %s %s\n' "${provider:-unknown}" "$out" "${aux:--}" >&3
}

stamp ready
printf 'READY %s\n' "$STAMPS" >&3
eofs=0
while :; do
  if ! IFS= read -r line <&3 && [ -z "$line" ]; then
    # EOF: no host connected (yet). Keep waiting a while, then give up (the host is gone).
    eofs=$((eofs + 1)); [ $eofs -gt 1200 ] && fail "the host channel stays closed"; sleep 0.05; continue
  fi
  eofs=0
  case "$line" in
    RUN\ *) break ;;
    VOLUME\ *) KEY=${line#VOLUME }; line=; open_volume; KEY= ;;
    CVM_REPORT\ *) RD=${line#CVM_REPORT }; line=; cvm_report ;;
    SECRET\ *)
      rest=${line#SECRET }; line=
      case "$rest" in
        *\ *) SNAME=${rest%% *}; SDATA=${rest#* }; rest=; put_secret; SDATA= ;;
        *) rest=; serror "malformed frame" ;;
      esac ;;
  esac
done
SCRIPT=$(printf '%s' "${line#RUN }" | base64 -d) || fail "bad RUN frame"
( chroot /mnt/root /bin/sh -c "$SCRIPT" </dev/null 2>&1; echo "$?" > /tmp/rc ) | \
  while IFS= read -r out || [ -n "$out" ]; do
    printf 'OUT %s\n' "$(printf '%s\n' "$out" | base64 -w 0)" >&3
  done
printf 'EXIT %s\n' "$(cat /tmp/rc 2>/dev/null || echo 255)" >&3
kill -9 -1 2>/dev/null  # what the workload left running would keep /data busy
sync
close_volume
[ -z "$SECRETS" ] || umount /mnt/root/run/secrets
umount /mnt/root/dev /mnt/root/sys /mnt/root/proc /mnt/root /mnt/scratch /mnt/lower 2>/dev/null
$DM remove qvm-scratch >/dev/null 2>&1
reboot -f
