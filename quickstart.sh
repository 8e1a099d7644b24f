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
. scripts/setup.sh
evmm_setup
note() { evmm_note "$@"; }

note "building the default guest (Debian cloud kernel + busybox initramfs; cached)"
"$PY" -m evmm assets

if "$PY" -c 'import sys; from evmm.hostkvm import probe; sys.exit(0 if probe().can_boot_linux else 1)'; then
  note "booting: evmm run $*"
  exec "$PY" -m evmm run "$@"
fi
"$PY" -c 'from evmm.hostkvm import probe; print("evmm:", probe().reason)' >&2
note "booting inside the KVM test host: evmm testhost run -- evmm run $*"
exec "$PY" -m evmm testhost run -- "$PY" -m evmm run "$@"
