"""Container engines in the KVM test host, each started by the test (tests/linux/engines.py): runc through
each one first (the floor: the engine, its image and the host are sound), then evmm-oci (issue 16)."""

from __future__ import annotations

import pytest

from tests.linux.engines import IMAGE, engine, missing, run

pytestmark = pytest.mark.skipif(missing() is not None, reason=missing() or "")


@pytest.mark.cost(120)
@pytest.mark.parametrize("name", ["docker", "podman", "containerd"])
def test_runc_through_the_engine(name: str) -> None:
    """The floor: ``run --rm IMG sh -c 'echo ...; exit 3'`` through the engine with runc gives 3 and the output."""
    with engine(name) as eng:
        args = ["--rm", IMAGE, "sh", "-c", "echo hello from $(hostname); exit 3"]
        if name == "containerd":
            args = ["--rm", IMAGE, "floor", "sh", "-c", "echo hello from $(hostname); exit 3"]
        r = run(eng.run_argv("runc", *args), check=False)
        assert r.returncode == 3, r.stderr
        assert "hello from" in r.stdout
