"""Run programs in a microVM from Python: ``Sandbox`` (asyncio), the guest agent's client, and their types.

See evmm/sandbox/sandbox.py for the API and docs/agent-protocol.md for what travels to the guest.
"""

from __future__ import annotations

from evmm.sandbox.client import AgentClient, AgentError
from evmm.sandbox.files import Files, FileStat
from evmm.sandbox.process import ExecResult, ExitStatus, OutputStream, Process, StdinWriter
from evmm.sandbox.sandbox import Sandbox
from evmm.sandbox.spec import Container, ExecSpec, Mount, Rlimit, User
from evmm.sandbox.vmm import VmOptions

__all__ = [
    "AgentClient",
    "AgentError",
    "Container",
    "ExecResult",
    "ExecSpec",
    "ExitStatus",
    "FileStat",
    "Files",
    "Mount",
    "OutputStream",
    "Process",
    "Rlimit",
    "Sandbox",
    "StdinWriter",
    "User",
    "VmOptions",
]
