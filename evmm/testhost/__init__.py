"""The KVM test host: a QEMU-TCG guest with emulated AMD SVM whose ``/dev/kvm`` (``kvm_amd``) boots Linux.

Hosts whose own ``/dev/kvm`` cannot run guest ring-0 code natively (PVM) run evmm's Linux-booting work
inside it: ``evmm testhost run -- CMD`` runs CMD there, with the host root shared read-only.
"""
