"""Guest-physical and port address spaces as region trees, flattened into views that listeners make real.

region.py    the tree's nodes: Ram, Rom, Io, Container, Alias
flatview.py  flattening a tree (priorities, aliases, overlap) and the difference of two views
space.py     AddressSpace: a root, its view, transactions, and the listeners told of each change
listener.py  KVM memory slots and ioeventfds; a Bus for the vCPU exit dispatcher
"""

from evmm.address_space.flatview import FlatRange, FlatView, IoEventFd, diff, flatten
from evmm.address_space.region import Alias, Container, Io, IoEventFdSpec, Ram, Region, Rom
from evmm.address_space.space import AddressSpace, Listener

__all__ = [
    "AddressSpace",
    "Alias",
    "Container",
    "FlatRange",
    "FlatView",
    "Io",
    "IoEventFd",
    "IoEventFdSpec",
    "Listener",
    "Ram",
    "Region",
    "Rom",
    "diff",
    "flatten",
]
