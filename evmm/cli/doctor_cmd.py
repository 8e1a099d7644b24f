"""``evmm doctor``: what this host's KVM offers and which way Linux guests take here."""

from __future__ import annotations

import argparse
import json

from evmm.doctor import diagnose
from evmm.oci import doctor as oci_doctor


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("doctor", help="report what this host's KVM offers", description=__doc__)
    p.add_argument("--kvm", default="/dev/kvm", help="KVM device (default /dev/kvm)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    r = diagnose(args.kvm)
    engines = oci_doctor.engines()
    if args.json:
        print(
            json.dumps(
                {
                    "kvm_present": r.host.present,
                    "module": r.host.module,
                    "api_version": r.api_version,
                    "max_vcpus": r.max_vcpus,
                    "capabilities": r.caps,
                    "ring0_loop_rate": r.loop_rate,
                    "ring0_native": r.ring0_native,
                    "can_boot_linux": r.host.can_boot_linux and r.ring0_native is not False,
                    "qemu": r.qemu,
                    "evmm_oci": oci_doctor.runtime_on_path(),
                    "engines": {
                        e.engine: {"installed": e.installed, "wired": e.wired, "detail": e.detail}
                        for e in engines
                    },
                    "verdict": r.verdict,
                },
                indent=2,
            )
        )
        return 0 if r.host.present and not r.missing_required else 1
    con = Console()
    t = Table(title="evmm doctor", show_header=False)
    t.add_row("KVM device", f"{args.kvm}: {r.host.reason}")
    if r.host.present:
        t.add_row("API version", str(r.api_version))
        t.add_row("max vCPUs", str(r.max_vcpus))
        for name, ok in r.caps.items():
            t.add_row(name, "[green]yes[/]" if ok else "[red]no[/]")
        if r.loop_rate is not None:
            speed = "native" if r.ring0_native else "[red]emulated[/]"
            t.add_row("ring-0 guest code", f"{speed} ({r.loop_rate / 1e6:.2f} M loop iterations/s)")
        elif r.probe_error:
            t.add_row("ring-0 guest code", f"[red]probe failed[/]: {r.probe_error}")
    t.add_row("KVM test host", f"qemu at {r.qemu}" if r.qemu else "[red]qemu-system-x86_64 not installed[/]")
    oci = oci_doctor.runtime_on_path()
    t.add_row("evmm-oci", oci or "[yellow]not on PATH[/] (pip install evmm; or python -m evmm.oci)")
    for e in engines:
        state = "[green]set up[/]" if e.wired else "[yellow]not set up[/]" if e.installed else "not installed"
        t.add_row(e.engine, f"{state}: {e.detail}" if e.installed else state)
    con.print(t)
    con.print(r.verdict)
    return 0 if r.host.present and not r.missing_required else 1
