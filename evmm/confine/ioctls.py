"""ioctl request numbers that the seccomp lists name and other evmm modules issue, from the Linux headers.

This module imports nothing: the filter builder (``policy``) takes the numbers from here rather than from
the modules that issue them, which would load a device package or the snapshot code into every evmm start.
"""

# <linux/fs.h>: _IOW(0x94, 9, int), share a file's extents with another (a snapshot's disk copy).
FICLONE = 0x40049409

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
TUNSETQUEUE = 0x400454D9

# <linux/sockios.h>: an interface's MTU, read through an AF_INET datagram socket (a tap's).
SIOCGIFMTU = 0x8921
