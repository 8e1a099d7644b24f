# The only reason for a setup.py: cffi compiles evmm/kvm/_kvm_ffi and _vhost_ffi against the host's
# <linux/kvm.h> and <linux/vhost.h> at install time (API mode), and `cffi_modules` is a setup() keyword that
# pyproject.toml cannot express.
from setuptools import setup

setup(
    cffi_modules=[
        "evmm/kvm/_build.py:ffibuilder",
        "evmm/kvm/_vhost_build.py:ffibuilder",
        "evmm/confine/_build.py:ffibuilder",
    ]
)
