"""Just enough ELF64 parsing to bundle a dynamically linked program: its interpreter and DT_NEEDED entries.

Read straight from the file (System V gABI, "Dynamic Section") rather than by running ldd: ldd would resolve
against the host's libraries, while the guest gets the libraries of the unpacked Debian packages.
"""

from __future__ import annotations

import struct

from evmm.errors import EvmmError
from evmm.record import record

_PT_DYNAMIC = 2
_PT_INTERP = 3
_DT_NEEDED = 1
_DT_STRTAB = 5
_DT_RPATH = 15
_DT_RUNPATH = 29


@record(frozen=True)
class DynamicInfo:
    interpreter: str | None  # PT_INTERP, e.g. /lib64/ld-linux-x86-64.so.2; None for a static program
    needed: tuple[str, ...]  # DT_NEEDED sonames, in order
    runpath: tuple[str, ...] = ()  # DT_RUNPATH (or DT_RPATH) directories, e.g. /usr/lib/x86_64-linux-gnu/ceph


def dynamic_info(data: bytes, name: str) -> DynamicInfo:
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise EvmmError(f"{name}: not a little-endian ELF64 file")
    phoff, phentsize, phnum = struct.unpack_from("<Q", data, 0x20)[0], *struct.unpack_from("<HH", data, 0x36)
    segments = []
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        segments.append((p_type, p_offset, p_vaddr, p_filesz))
    interpreter = None
    dynamic: list[tuple[int, int]] = []
    for p_type, offset, _, size in segments:
        if p_type == _PT_INTERP:
            interpreter = data[offset : offset + size].split(b"\0")[0].decode()
        elif p_type == _PT_DYNAMIC:
            for pos in range(offset, offset + size - 15, 16):
                tag, value = struct.unpack_from("<qQ", data, pos)
                if tag == 0:
                    break
                dynamic.append((tag, value))
    strtab_vaddr = next((v for t, v in dynamic if t == _DT_STRTAB), None)
    if strtab_vaddr is None:
        return DynamicInfo(interpreter, ())
    strtab = _vaddr_to_offset(segments, strtab_vaddr, name)

    def string(offset: int) -> str:
        return data[strtab + offset : data.index(b"\0", strtab + offset)].decode()

    needed = tuple(string(v) for t, v in dynamic if t == _DT_NEEDED)
    runpath = tuple(d for t, v in dynamic if t in (_DT_RUNPATH, _DT_RPATH) for d in string(v).split(":") if d)
    return DynamicInfo(interpreter, needed, runpath)


def _vaddr_to_offset(segments: list[tuple[int, int, int, int]], vaddr: int, name: str) -> int:
    _PT_LOAD = 1
    for p_type, offset, seg_vaddr, size in segments:
        if p_type == _PT_LOAD and seg_vaddr <= vaddr < seg_vaddr + size:
            return offset + vaddr - seg_vaddr
    raise EvmmError(f"{name}: DT_STRTAB address {vaddr:#x} lies in no loaded segment")
