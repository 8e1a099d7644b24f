"""Command-line values: sizes, CPU counts, files, the merged kernel command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from evmm.errors import ConfigError
from evmm.machine.cmdline import merge_cmdline
from evmm.machine.config import check_cpus, check_file, check_memory, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [("256M", 256 << 20), ("1G", 1 << 30), ("512MiB", 512 << 20), ("128", 128 << 20), ("2048k", 2 << 20)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "1.5G", "-1M", "12X"])
def test_bad_sizes_name_the_value(text: str) -> None:
    with pytest.raises(ConfigError, match=f"--memory '{text}' is not a size"):
        parse_size(text)


def test_memory_limits() -> None:
    with pytest.raises(ConfigError, match="too small"):
        check_memory(16 << 20)
    with pytest.raises(ConfigError, match="multiple of 2M"):
        check_memory((64 << 20) + 4096)
    assert check_memory(64 << 20) == 64 << 20


def test_cpu_limits() -> None:
    for bad in (0, -1, 33):
        with pytest.raises(ConfigError, match=f"--cpus {bad} is out of range: 1 to 32"):
            check_cpus(bad)
    with pytest.raises(ConfigError, match="1 to 4"):
        check_cpus(5, host_max=4)
    assert check_cpus(32) == 32


def test_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        check_file(tmp_path / "nope", "--kernel")
    with pytest.raises(ConfigError, match="not a regular file"):
        check_file(tmp_path, "--kernel")


def test_cmdline_defaults_yield_to_the_user() -> None:
    defaults = ["console=ttyS0", "panic=-1", "pci=off"]
    assert merge_cmdline("", defaults) == "console=ttyS0 panic=-1 pci=off"
    assert merge_cmdline("console=hvc0 quiet", defaults) == "panic=-1 pci=off console=hvc0 quiet"
    # Words after "--" go to init and are not kernel parameters.
    assert (
        merge_cmdline("quiet -- console=x", defaults) == "console=ttyS0 panic=-1 pci=off quiet -- console=x"
    )
