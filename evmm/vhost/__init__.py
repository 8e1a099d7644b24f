"""Host-kernel virtio back ends (``/dev/vhost-*``): the kernel serves a device's virtqueues itself.

Not KVM: vhost is its own character device with its own ioctls (<linux/vhost.h>), and evmm/kvm knows nothing
of it.  ``backend`` holds what every vhost device shares (owner, features, memory table, rings, kick and call
eventfds); one module per device adds its own ioctls.  The cffi bindings (``_build.py``) load only when one
of them is imported.
"""
