"""evmm-agent's files and housekeeping, end to end on this host (the real agent, ASan/UBSan build, on a
Unix socket) through ``evmm.sandbox.Files``: streamed writes and reads of any size with mode and owner kept,
a write whose length or CRC-32 does not match leaving the target untouched, stat, paged list, mkdir, remove,
the failed system call as the matching OSError, and the housekeeping methods a host test may call.
"""

from __future__ import annotations

import os
import shutil
import zlib
from pathlib import Path

import pytest

from evmm.sandbox import AgentClient, AgentError
from tests.fakes.agent import HostAgent, host_agent_fixtures

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc builds evmm-agent")
ROOT = os.geteuid() == 0


host_agent, client = host_agent_fixtures()


@pytest.mark.parametrize("size", [0, 1, 256 << 10, (5 << 20) + 7])
async def test_write_then_read_back_any_size(client: AgentClient, tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    target = str(tmp_path / "f")
    await client.files.write(target, data, mode=0o640)
    assert Path(target).read_bytes() == data
    assert Path(target).stat().st_mode & 0o7777 == 0o640
    assert await client.files.read(target) == data
    assert [p.name for p in tmp_path.iterdir()] == ["f"]  # no temporary file left


@pytest.mark.skipif(not ROOT, reason="only root may give a file away")
async def test_owner_and_special_mode_bits_are_kept(client: AgentClient, tmp_path: Path) -> None:
    target = str(tmp_path / "owned")
    await client.files.write(target, b"x", mode=0o4751, uid=1234, gid=5678)
    st = Path(target).stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1234, 5678, 0o4751)
    info = await client.files.stat(target)
    assert (info.uid, info.gid, info.mode, info.type, info.size) == (1234, 5678, 0o4751, "file", 1)


async def test_put_and_get_keep_the_mode(client: AgentClient, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(700_000))
    src.chmod(0o751)
    assert await client.files.put(src, str(tmp_path / "in-guest")) == 700_000
    assert (tmp_path / "in-guest").stat().st_mode & 0o777 == 0o751
    assert await client.files.get(str(tmp_path / "in-guest"), tmp_path / "back") == 700_000
    assert (tmp_path / "back").read_bytes() == src.read_bytes()
    assert (tmp_path / "back").stat().st_mode & 0o777 == 0o751


async def test_a_write_that_does_not_match_leaves_the_target_alone(
    client: AgentClient, tmp_path: Path
) -> None:
    target = tmp_path / "keep"
    target.write_bytes(b"old")
    handle = (await client.call("file-put", {"path": str(target)}))["handle"]
    await client.call("file-write", {"handle": handle, "data": b"new data"})
    with pytest.raises(AgentError, match=r"the agent received 8 with .* not written"):
        await client.call("file-commit", {"handle": handle, "size": 8, "crc32": zlib.crc32(b"other da")})
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]
    with pytest.raises(AgentError, match="no open handle"):
        await client.call("file-write", {"handle": handle, "data": b"x"})


async def test_an_abandoned_write_leaves_no_temporary_file(host_agent: HostAgent, tmp_path: Path) -> None:
    c = await AgentClient.unix(host_agent.path)
    handle = (await c.call("file-put", {"path": str(tmp_path / "half")}))["handle"]
    await c.call("file-write", {"handle": handle, "data": b"part"})
    await c.close()
    c = await AgentClient.unix(host_agent.path)
    await c.ping()  # the agent has handled the first client's departure by now
    await c.close()
    assert list(tmp_path.iterdir()) == []


async def test_failed_system_calls_are_the_matching_oserror(client: AgentClient, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"file-get .*/missing: No such file or directory"):
        await client.files.read(str(tmp_path / "missing"))
    with pytest.raises(IsADirectoryError):
        await client.files.read(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        await client.files.write(str(tmp_path / "no" / "dir" / "f"), b"x")
    with pytest.raises(FileExistsError):
        await client.files.mkdir(str(tmp_path))
    with pytest.raises(OSError, match="Directory not empty"):
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "f").write_bytes(b"")
        await client.files.remove(str(tmp_path / "d"))
    assert not await client.files.exists(str(tmp_path / "missing"))


async def test_stat_list_mkdir_remove(client: AgentClient, tmp_path: Path) -> None:
    await client.files.mkdir(str(tmp_path / "a" / "b" / "c"), mode=0o700, parents=True)
    assert (tmp_path / "a" / "b" / "c").stat().st_mode & 0o777 == 0o700
    await client.files.mkdir(str(tmp_path / "a" / "b" / "c"), parents=True)  # exists: fine, as mkdir -p
    (tmp_path / "a" / "link").symlink_to("b/c")
    link = await client.files.stat(str(tmp_path / "a" / "link"))
    assert (link.type, link.target) == ("symlink", "b/c")
    assert (await client.files.stat(str(tmp_path / "a" / "link"), follow=True)).type == "dir"
    names = sorted((e.name, e.type) for e in await client.files.list(str(tmp_path / "a")))
    assert names == [("b", "dir"), ("link", "symlink")]
    await client.files.remove(str(tmp_path / "a"), recursive=True)
    assert list(tmp_path.iterdir()) == []


async def test_a_large_directory_is_listed_in_pages(client: AgentClient, tmp_path: Path) -> None:
    names = {f"file-with-a-longish-name-{i:05d}" for i in range(7000)}
    for n in names:
        (tmp_path / n).touch()
    handle = await client.call("list", {"path": str(tmp_path)})
    assert handle["next"] is not None  # more than one answer's worth
    assert {e.name for e in await client.files.list(str(tmp_path))} == names


async def test_names_that_are_not_utf8_come_back_as_bytes(client: AgentClient, tmp_path: Path) -> None:
    odd = os.fsencode(str(tmp_path)) + b"/caf\xe9"
    with open(odd, "wb"):
        pass
    [entry] = await client.files.list(str(tmp_path))
    assert os.fsencode(entry.name) == b"caf\xe9"


async def test_housekeeping_on_a_host(client: AgentClient) -> None:
    await client.sync()
    with pytest.raises(AgentError, match="refused"):
        await client.set_time()
    with pytest.raises(AgentError, match="refused"):
        await client.call("poweroff")
    if ROOT:
        await client.add_entropy(os.urandom(64))
    else:
        with pytest.raises(AgentError, match="add-entropy"):
            await client.add_entropy(os.urandom(64))
