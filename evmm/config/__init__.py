"""Configuration as users write it, parsed into typed values: imported by the devices, the machine and the CLI.

It sits below all three, so a device can take its own spec (``DriveSpec``, ``NetSpec``...) without importing
the machine that builds it.  Nothing here opens a file or touches KVM.
"""
