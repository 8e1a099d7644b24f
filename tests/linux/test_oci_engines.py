"""evmm-oci under the container engines, in the KVM test host (issue 16, "Done means").

Each engine is started by the test (tests/linux/engines.py) with evmm-oci registered next to runc.  The
default run has one end-to-end test per engine: runc first (the floor: engine, image and host are sound),
then evmm-oci, ``run --rm IMG sh -c '...; exit 3'`` giving 3 and the output in order.  The slower scenarios
carry ``@pytest.mark.engines`` and run with ``-m engines``.
"""

from __future__ import annotations

import pytest

from tests.linux.engines import IMAGE, Containerd, Engine, engine, evmm_oci_missing, missing, run

pytestmark = pytest.mark.skipif(missing() is not None, reason=missing() or "")
ENGINE_NAMES = ["docker", "podman", "containerd"]
SCRIPT = "for i in 1 2 3; do echo out$i; echo err$i >&2; done; echo done; exit 3"


def run_argv(eng: Engine, runtime: str, name: str, *command: str, options: tuple[str, ...] = ()) -> list[str]:
    """``run --rm IMAGE COMMAND`` through ``eng`` (ctr also wants a container id after the image)."""
    if isinstance(eng, Containerd):
        return eng.run_argv(runtime, *options, "--rm", IMAGE, name, *command)
    return eng.run_argv(runtime, *options, "--rm", IMAGE, *command)


@pytest.mark.cost(600)
@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_run_exit_code_and_output(name: str) -> None:
    with engine(name) as eng:
        floor = run(run_argv(eng, "runc", "floor", "sh", "-c", SCRIPT), check=False)
        assert floor.returncode == 3, floor.stderr
        assert floor.stdout.split() == ["out1", "out2", "out3", "done"]
        if (why := evmm_oci_missing()) is not None:
            pytest.skip(why)
        r = run(run_argv(eng, "evmm", "vm", "sh", "-c", SCRIPT), check=False)
        assert r.returncode == 3, r.stderr
        assert r.stdout.split() == ["out1", "out2", "out3", "done"]
        assert [w for w in r.stderr.split() if w.startswith("err")] == ["err1", "err2", "err3"]
