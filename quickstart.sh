#!/usr/bin/env bash
# Set up evmm on a fresh Debian 12 machine and boot the default guest to a shell on this terminal.
#
#   ./quickstart.sh [evmm run options...]      e.g.  ./quickstart.sh --cpus 2 --memory 512M
#
# Installs what evmm needs (apt + pip), builds the default guest from Debian packages (cached in
# ~/.cache/evmm), then runs `evmm run`.  Where this host's /dev/kvm cannot boot Linux (a PVM-based KVM, or
# none), it boots the guest inside evmm's KVM test host instead: a QEMU-TCG guest with a genuine KVM.
# Leave the guest with `poweroff` (or Ctrl-] q).
set -euo pipefail
cd "$(dirname "$0")"
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

note() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

if ! command -v qemu-system-x86_64 >/dev/null || ! command -v busybox >/dev/null || ! command -v lz4 >/dev/null; then
  note "installing system packages"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
    python3 python3-pip python3-venv gcc libc6-dev linux-libc-dev \
    qemu-system-x86 busybox-static cpio kmod lz4 acpica-tools tmux iproute2 socat procps
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import evmm.kvm' 2>/dev/null; then
  note "installing evmm (pip install -e .[dev])"
  "$PY" -m pip install -q -e '.[dev]'
fi

note "building the default guest (Debian cloud kernel + busybox initramfs; cached)"
"$PY" -m evmm assets

if "$PY" -c 'import sys; from evmm.hostkvm import probe; sys.exit(0 if probe().can_boot_linux else 1)'; then
  note "booting: evmm run $*"
  exec "$PY" -m evmm run "$@"
fi
"$PY" -c 'from evmm.hostkvm import probe; print("evmm:", probe().reason)' >&2
note "booting inside the KVM test host: evmm testhost run -- evmm run $*"
exec "$PY" -m evmm testhost run -- "$PY" -m evmm run "$@"
