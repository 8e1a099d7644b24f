"""``evmm assets``: build the default guest and the KVM test host's images from Debian packages (cached)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "assets",
        help="build the default guest kernel + initramfs and the KVM test host (from Debian packages)",
        description="Download Debian's cloud kernel, busybox-static and the test tools' packages, and build the "
        "default guest (vmlinuz, vmlinux, initramfs) and the KVM test host's kernel and initramfs into the cache "
        "($EVMM_CACHE or ~/.cache/evmm). Does nothing when they are already built, unless --force.",
    )
    parser.add_argument("--cache", type=Path, default=None, metavar="DIR", help="cache directory")
    parser.add_argument("--force", action="store_true", help="download and rebuild everything")
    parser.add_argument(
        "--no-tools", action="store_true", help="skip the tools initramfs (fio, iperf3, socat)"
    )
    parser.add_argument("--no-testhost", action="store_true", help="skip the KVM test host's images")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from evmm.assets.cache import cache_root
    from evmm.assets.guest import build_default_guest
    from evmm.testhost.assets import build_testhost_assets

    console = Console(stderr=True)
    started = time.monotonic()
    steps: list[str] = []
    with console.status("", spinner="dots") as status:

        def step(message: str) -> None:
            elapsed = time.monotonic() - started
            steps.append(message)
            status.update(f"{message} ...")
            console.print(f"[dim]{elapsed:5.1f}s[/] {message}", highlight=False)

        guest = build_default_guest(args.cache, force=args.force, tools=not args.no_tools, step=step)
        testhost = (
            None if args.no_testhost else build_testhost_assets(args.cache, force=args.force, step=step)
        )
    if steps:
        console.print(f"[green]built[/] in {time.monotonic() - started:.1f}s, cache {cache_root(args.cache)}")
    else:
        console.print(f"[green]already built[/] in {cache_root(args.cache)} (--force rebuilds)")
    # The paths go to stdout, one per line as NAME PATH, for scripts; the progress went to stderr.
    print(f"kernel-version {guest.kernel_version}")
    print(f"bzimage {guest.bzimage}")
    print(f"vmlinux {guest.vmlinux}")
    print(f"initramfs {guest.initramfs}")
    if guest.tools_initramfs.is_file():
        print(f"tools-initramfs {guest.tools_initramfs}")
    if testhost is not None:
        print(f"testhost-kernel {testhost.kernel}")
        print(f"testhost-initramfs {testhost.initramfs}")
    return 0
