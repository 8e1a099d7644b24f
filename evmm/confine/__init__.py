"""Confinement: seccomp filters per thread role (``seccomp``, ``policy``, ``bpf``), and ``evmm jail``'s
namespaces, root and cgroup (``jail``, ``jailer``, ``cgroup``).  docs/security.md has the threat model."""
