#!/usr/bin/env bash
# Install the qvm node-agent on a GPU host (Ubuntu >= 22.04 or Debian >= 12), as root:
#
#   sudo bash deploy/install.sh --token TOKEN --control-plane URL
#
# 1. checks that it runs as root on a supported system (--force: any other Debian-like one);
# 2. installs the Debian packages the agent needs, where missing (--no-apt: none);
# 3. makes the Python environment <prefix>/venv and installs qvm[node-agent,cli] into it from --source (default:
#    the checkout this script is in); --venv: use an environment that already has them (air-gapped hosts, tests);
# 4. runs `python -m shared.cli.node_install install` with the same paths (the steps live there, once):
#    directories, <etc>/node.env, the systemd unit, the join with --token, and enabling the unit.
#
# Every step checks first: a second run changes nothing that is already right. To remove it all again:
#   <prefix>/venv/bin/python -m shared.cli.node_install uninstall (with the same paths)
#
# Flags: --prefix DIR (/opt/qvm)  --etc DIR (/etc/qvm)  --state DIR (/var/lib/qvm)
#        --systemd-dir DIR (/etc/systemd/system)  --token TOKEN (or QVM_JOIN_TOKEN)  --control-plane URL
#        --tpm TCTI (device:/dev/tpmrm0)  --venv DIR  --source DIR  --python PYTHON  --no-apt  --no-start  --force
# QVM_OS_RELEASE: the os-release file to read (default /etc/os-release).
set -euo pipefail

die() {
  echo "install.sh: $*" >&2
  exit 1
}
step() { echo "==> $*"; }

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

abspath() {
  case "$1" in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s/%s\n' "$PWD" "$1" ;;
  esac
}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PREFIX=/opt/qvm
ETC=/etc/qvm
STATE=/var/lib/qvm
SYSTEMD_DIR=/etc/systemd/system
TOKEN=${QVM_JOIN_TOKEN:-}
CONTROL_PLANE=
TPM=
VENV=
SOURCE=$(dirname "$HERE")
PYTHON=
APT=1
START=1
FORCE=0

while [ $# -gt 0 ]; do
  flag=$1
  case "$flag" in
    --*=*) value=${flag#*=}; flag=${flag%%=*}; shift ;;
    --prefix | --etc | --state | --systemd-dir | --token | --control-plane | --tpm | --venv | --source | --python)
      [ $# -ge 2 ] || die "$flag needs a value"
      value=$2
      shift 2
      ;;
    *) value=; shift ;;
  esac
  case "$flag" in
    --prefix) PREFIX=$(abspath "$value") ;;
    --etc) ETC=$(abspath "$value") ;;
    --state) STATE=$(abspath "$value") ;;
    --systemd-dir) SYSTEMD_DIR=$(abspath "$value") ;;
    --token) TOKEN=$value ;;
    --control-plane) CONTROL_PLANE=$value ;;
    --tpm) TPM=$value ;;
    --venv) VENV=$(abspath "$value") ;;
    --source) SOURCE=$(abspath "$value") ;;
    --python) PYTHON=$value ;;
    --no-apt) APT=0 ;;
    --no-start) START=0 ;;
    --force) FORCE=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown flag: $flag (--help lists them)" ;;
  esac
done

# ------------------------------------------------------------------------------------------ root and system
[ "$(id -u)" -eq 0 ] || die "run it as root (sudo bash $0 ...): the agent binds GPUs, makes cgroups and netns"

OS_RELEASE=${QVM_OS_RELEASE:-/etc/os-release}
os_field() {
  # The value of KEY=VALUE in the os-release file, quotes removed (never sourced: it is data).
  sed -n "s/^$1=//p" "$OS_RELEASE" 2>/dev/null | tail -n 1 | tr -d "\"'"
}
version_ge() {
  # $1 >= $2 as versions (22.04 >= 22.04, 24.10 >= 22.04, 12 >= 12)
  [ -n "$1" ] && [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n 1)" = "$2" ]
}
OS_ID=$(os_field ID)
OS_VERSION=$(os_field VERSION_ID)
OS_NAME=$(os_field PRETTY_NAME)
OS_NAME=${OS_NAME:-${OS_ID:-unknown} ${OS_VERSION}}
case "$OS_ID" in
  ubuntu) OS_MIN=22.04 ;;
  debian) OS_MIN=12 ;;
  *) OS_MIN= ;;
esac
if [ -n "$OS_MIN" ] && version_ge "$OS_VERSION" "$OS_MIN"; then
  step "system: $OS_NAME"
elif [ "$FORCE" -eq 1 ]; then
  echo "install.sh: warning: $OS_NAME is not a supported system; going on (--force)" >&2
else
  die "unsupported system: ${OS_NAME} (from $OS_RELEASE). qvm nodes run Ubuntu >= 22.04 or Debian >= 12;" \
    "--force installs anyway"
fi

# ------------------------------------------------------------------------------------------ Debian packages
python_ok() {
  command -v "$1" >/dev/null 2>&1 && "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

# QEMU for the micro VMs, cryptsetup for volume erasure, the TPM's tools and libtss2 (tpm2-pytss builds against
# it with pkg-config and a compiler), busybox-static and e2fsprogs for guest images, libseccomp for the VMM's
# syscall allow-list, ip and nft for each instance's netns and rules, WireGuard for the node's tunnel.
PACKAGES=(qemu-system-x86 cryptsetup-bin tpm2-tools libtss2-dev pkg-config build-essential busybox-static
  e2fsprogs libseccomp2 iproute2 nftables wireguard-tools kmod ca-certificates)
if [ -z "$VENV" ]; then
  if [ "$OS_ID" = ubuntu ] && ! version_ge "$OS_VERSION" 23.04; then
    PACKAGES+=(python3.11 python3.11-venv python3.11-dev) # 22.04's python3 is 3.10; qvm needs 3.11+
  else
    PACKAGES+=(python3 python3-venv python3-dev)
  fi
fi
# Userspace WireGuard only where the kernel has no module for it (built in counts: modinfo finds it too).
if ! modinfo wireguard >/dev/null 2>&1; then
  PACKAGES+=(wireguard-go)
fi

if [ "$APT" -eq 1 ]; then
  missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    step "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    step "Debian packages: all there"
  fi
else
  step "Debian packages: skipped (--no-apt)"
fi

# ------------------------------------------------------------------------------------------ Python environment
if [ -n "$VENV" ]; then
  [ -x "$VENV/bin/python" ] || die "--venv $VENV: no $VENV/bin/python"
  step "Python environment: $VENV (given)"
else
  VENV=$PREFIX/venv
  [ -f "$SOURCE/pyproject.toml" ] || die "--source $SOURCE: not a qvm checkout (no pyproject.toml)"
  if [ ! -x "$VENV/bin/python" ]; then
    if [ -z "$PYTHON" ]; then
      for candidate in python3 python3.13 python3.12 python3.11; do
        if python_ok "$candidate"; then
          PYTHON=$candidate
          break
        fi
      done
    fi
    if [ -z "$PYTHON" ] || ! python_ok "$PYTHON"; then
      die "no Python 3.11+ found (--python PATH, or install python3.11)"
    fi
    step "creating $VENV ($("$PYTHON" --version))"
    mkdir -p "$PREFIX"
    "$PYTHON" -m venv "$VENV"
  fi
  step "installing qvm[node-agent,cli] from $SOURCE into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q --upgrade "${SOURCE}[node-agent,cli]"
fi

# ------------------------------------------------------------------------------------------ the node
args=(install --prefix "$PREFIX" --etc "$ETC" --state "$STATE" --systemd-dir "$SYSTEMD_DIR" --venv "$VENV")
if [ -n "$CONTROL_PLANE" ]; then args+=(--control-plane "$CONTROL_PLANE"); fi
if [ -n "$TPM" ]; then args+=(--tpm "$TPM"); fi
if [ "$START" -eq 0 ]; then args+=(--no-start); fi
if [ -n "$TOKEN" ]; then
  export QVM_JOIN_TOKEN=$TOKEN # the environment, not argv: other users can read a process's command line
else
  unset QVM_JOIN_TOKEN
fi
step "qvm node install"
# -P: the module comes from the environment, never from a `shared/` in the current directory.
exec "$VENV/bin/python" -P -m shared.cli.node_install "${args[@]}"
