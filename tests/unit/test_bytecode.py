"""evmm.bytecode writes .pyc files whatever PYTHONDONTWRITEBYTECODE says."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from evmm.bytecode import precompile


def test_writes_bytecode_even_when_python_would_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    (tmp_path / "mod.py").write_text("X = 1\n")
    precompile(tmp_path)
    assert Path(importlib.util.cache_from_source(str(tmp_path / "mod.py"))).is_file()
