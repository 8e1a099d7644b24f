"""The VMM's event loop without OpenSSL (evmm/loop/nossl.py): uvloop works, TLS is refused in one line, and
nothing on ``evmm run``'s path loads libssl or libcrypto (4 MiB of a VMM's 20)."""

from __future__ import annotations

from tests.unit.test_seccomp_runtime import _python as run_python


def _python(code: str) -> str:
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    return r.stdout


OPENSSL_MAPPED = (
    "print('openssl', any(lib in open('/proc/self/maps').read() for lib in ('libssl', 'libcrypto')))"
)


def test_uvloop_runs_without_openssl_and_refuses_tls_in_one_line() -> None:
    out = _python(
        f"""
        from evmm.loop.nossl import import_without_ssl
        print("imported", import_without_ssl())
        import asyncio, socket, sys, uvloop
        {OPENSSL_MAPPED}
        print("asyncio ssl", asyncio.base_events.ssl, asyncio.sslproto.ssl)
        loop = uvloop.new_event_loop()
        a, b = socket.socketpair()
        async def main():
            fut = loop.create_future()
            loop.add_reader(a.fileno(), lambda: fut.done() or fut.set_result(a.recv(1)))
            b.send(b"x")
            print("read", await fut)
            try:
                await loop.create_connection(asyncio.Protocol, "127.0.0.1", 9, ssl=True)
            except Exception as e:
                print("tls:", type(e).__name__, e)
        loop.run_until_complete(main())
        import ssl  # any other user of the process gets the real module
        print("real ssl", ssl.OPENSSL_VERSION.startswith("OpenSSL"))
        """
    )
    assert "imported True" in out
    assert "openssl False" in out
    assert "asyncio ssl None None" in out
    assert "read b'x'" in out
    assert "tls: TlsUnavailable evmm loaded its event loop without OpenSSL" in out
    assert "real ssl True" in out


def test_nothing_is_done_where_asyncio_is_loaded_already() -> None:
    out = _python(
        """
        import asyncio
        from evmm.loop.nossl import import_without_ssl
        print("imported", import_without_ssl(), asyncio.sslproto.ssl is not None)
        """
    )
    assert "imported False True" in out


def test_a_uvloop_needing_more_of_ssl_is_loaded_with_the_real_one() -> None:
    """A later uvloop that reads a name the stand-in lacks still loads (with OpenSSL), never breaks evmm run."""
    out = _python(
        """
        import evmm.loop.nossl as nossl
        real = nossl._standin
        def lacking():
            ssl = real()
            del ssl.SSL_ERROR_SYSCALL  # as a uvloop reading it at import would find
            return ssl
        nossl._standin = lacking
        import sys
        # uvloop's import reads the name: a stand-in uvloop module doing just that, found first.
        import importlib.abc, importlib.machinery
        class Finder(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name != "uvloop":
                    return None
                return importlib.machinery.ModuleSpec(name, Loader())
        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return None
            def exec_module(self, module):
                import ssl
                module.code = ssl.SSL_ERROR_SYSCALL
        sys.meta_path.insert(0, Finder())
        print("imported", nossl.import_without_ssl())
        import uvloop
        print("code", uvloop.code, "ssl left", "ssl" in sys.modules and sys.modules["ssl"].__name__)
        """
    )
    assert "imported False" in out
    assert "code 5" in out  # read from the real ssl module
    assert "ssl left ssl" in out


def test_evmm_runs_path_loads_no_openssl() -> None:
    """Every module ``evmm run`` imports on its way to the first KVM_RUN, and the seccomp filters compiled."""
    out = _python(
        f"""
        import sys
        from evmm.cli.main import REACTOR_COMMANDS
        from evmm.loop.nossl import import_without_ssl
        assert "run" in REACTOR_COMMANDS and import_without_ssl()
        import evmm.cli.run_cmd, evmm.control, evmm.control.prompt, evmm.loop.console, evmm.loop.terminal
        import evmm.machine.microvm, evmm.snapshot.commands
        from evmm.confine import seccomp
        seccomp.enable(seccomp.Mode.KILL, seccomp.Features())
        {OPENSSL_MAPPED}
        """
    )
    assert "openssl False" in out
