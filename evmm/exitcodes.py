"""Exit codes of ``evmm run`` (documented in README.md): what ended the VM."""

from __future__ import annotations

EXIT_GUEST_POWEROFF = 0  # the guest powered off (ACPI S5), or an operator asked to quit
EXIT_ERROR = 1  # evmm could not start the VM: bad input, missing file, no usable KVM
EXIT_USAGE = 2  # bad command-line syntax (argparse's convention)
EXIT_GUEST_RESET = 3  # the guest rebooted (ACPI reset register, i8042 0xFE, KVM reset event)
EXIT_TRIPLE_FAULT = 4  # the vCPU shut down (triple fault): a crashed guest kernel or a bad boot
EXIT_KVM_ERROR = 5  # KVM reported an internal error or a failed VM entry
EXIT_GUEST_PANIC = 6  # the guest reported a kernel panic (pvpanic / KVM crash event)
EXIT_VMM_FAULT = 7  # evmm itself failed while the VM ran (a bug: the message says where)
EXIT_SECCOMP = 159  # a thread made a system call its seccomp filter forbids (128 + SIGSYS, as a shell shows a
# process killed by SIGSYS); stderr names the call, its arguments and the thread
EXIT_SIGINT = 130  # 128 + SIGINT
EXIT_SIGTERM = 143  # 128 + SIGTERM
