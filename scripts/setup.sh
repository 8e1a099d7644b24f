# Sourced by quickstart.sh and scripts/test: make sure this machine has what evmm needs, and set $PY to the
# Python that has evmm installed.
#
# System packages come from Debian (apt-get), evmm and its Python dependencies from PyPI (pip install -e
# .[dev]).  A Python that is "externally managed" (PEP 668: Debian's own /usr/bin/python3 refuses pip
# installs) gets a virtual environment, .venv in the checkout, instead; once that exists it is always used.
# $PYTHON picks another interpreter.

evmm_note() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

evmm_setup() {
  local root sudo=""
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  [ "$(id -u)" = 0 ] || sudo="sudo"

  local tool missing=""
  for tool in qemu-system-x86_64 busybox lz4 cpio depmod gcc tmux socat ip iasl iperf3 \
    dockerd podman containerd runc; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
  done
  [ -e /usr/include/linux/kvm.h ] || missing="$missing linux/kvm.h"
  if [ -n "$missing" ]; then
    evmm_note "installing system packages (missing:$missing)"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends \
      python3 python3-pip python3-venv python3-dev gcc libc6-dev linux-libc-dev \
      qemu-system-x86 busybox-static cpio kmod lz4 acpica-tools tmux iproute2 socat procps iperf3 \
      docker.io podman containerd runc crun conmon fuse-overlayfs iptables
  fi

  if [ -x "$root/.venv/bin/python" ]; then
    PY="$root/.venv/bin/python"
  else
    PY="${PYTHON:-python3}"
    if "$PY" -c 'import os, sys, sysconfig
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(0 if managed and sys.prefix == sys.base_prefix else 1)'; then
      evmm_note "$PY is managed by the system (PEP 668): making a virtual environment in $root/.venv"
      "$PY" -m venv "$root/.venv"
      PY="$root/.venv/bin/python"
    fi
  fi
  if ! "$PY" -c 'import evmm.kvm.system, evmm.vhost.vsock, evmm.devices.legacy.serial_fast, evmm.confine._seccomp_ffi, pytest_rerunfailures, qemu.qmp, matplotlib' 2>/dev/null; then
    evmm_note "installing evmm and its dependencies (pip install -e .[dev,bench])"
    "$PY" -m pip install -q -e "$root[dev,bench]"
  fi
  # Bytecode for evmm's sources now: where PYTHONDONTWRITEBYTECODE is set, every `evmm run` would compile
  # them again (evmm/bytecode.py).
  "$PY" -c 'from evmm.bytecode import precompile; precompile()'
  export PY
}
