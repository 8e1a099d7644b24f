# The only reason for a setup.py: cffi compiles evmm's C at install time (API mode): evmm/kvm/_kvm_ffi and
# evmm/vhost/_vhost_ffi against the host's <linux/kvm.h> and <linux/vhost.h>, and the 16550A's fast path
# (evmm/devices/legacy/serial_fast.c); `cffi_modules` is a setup() keyword that pyproject.toml cannot express.
from setuptools import setup

setup(
    cffi_modules=[
        "evmm/kvm/_build.py:ffibuilder",
        "evmm/vhost/_build.py:ffibuilder",
        "evmm/devices/legacy/_serial_build.py:ffibuilder",
    ]
)
