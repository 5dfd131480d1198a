"""Zeroconf discovery, checked with a python-zeroconf browser as Home Assistant would browse.

mDNS is multicast. Tests may only talk over loopback, and the host's loopback interface has no
MULTICAST flag, so the discovery test runs this file as a script inside a private network
namespace (`unshare --net --map-root-user`): its only interface is a fresh loopback with
multicast switched on and 224.0.0.0/4 routed over it. There the server binds 0.0.0.0 like the
Docker image does, and must announce the address it detects (127.0.0.1), never 0.0.0.0.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from wyoming_soprano.__main__ import main
from wyoming_soprano.zeroconf import AnnouncementError, advertised_address

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVICE_TYPE = "_wyoming._tcp.local."
INSTANCE = "soprano-test"
STARTUP_TIMEOUT = 180.0
EVENT_TIMEOUT = 60.0
NAMESPACE_SETUP = (
    "ip link set lo up && ip link set lo multicast on"
    " && ip route add 224.0.0.0/4 dev lo src 127.0.0.1"
)


def test_server_is_discovered_with_a_usable_address_and_withdrawn_on_shutdown(
    tiny_checkpoint: Path,
) -> None:
    result = subprocess.run(
        [
            *("unshare", "--net", "--map-root-user", "sh", "-c"),
            f'{NAMESPACE_SETUP} && exec "$0" "$@"',
            *(sys.executable, __file__, str(tiny_checkpoint)),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT + 2 * EVENT_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["name"] == f"{INSTANCE}.{SERVICE_TYPE}"
    assert report["addresses"] == ["127.0.0.1"]
    assert report["port"] == report["bound_port"]
    assert report["program"] == "soprano", "a client could use the announced address"
    assert report["withdrawn"] is True
    assert report["server_exit_code"] == 0, result.stderr


@pytest.mark.parametrize(
    ("bind_host", "override", "expected"),
    [
        ("0.0.0.0", "192.168.1.20", "192.168.1.20"),
        ("127.0.0.1", None, "127.0.0.1"),
        ("localhost", None, "127.0.0.1"),
        ("10.1.2.3", "10.9.8.7", "10.9.8.7"),
    ],
)
def test_advertised_address_prefers_the_override_then_the_bound_address(
    bind_host: str, override: str | None, expected: str
) -> None:
    assert advertised_address(bind_host, override) == expected


@pytest.mark.parametrize(
    ("bind_host", "override"),
    [("0.0.0.0", "0.0.0.0"), ("0.0.0.0", "169.254.10.1"), ("::", "fe80::1"), ("::", "::")],
)
def test_unusable_addresses_are_refused(bind_host: str, override: str) -> None:
    with pytest.raises(AnnouncementError, match="clients cannot connect"):
        advertised_address(bind_host, override)


def test_zeroconf_needs_a_tcp_uri(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--uri", "stdio://", "--zeroconf"])
    assert exit_info.value.code == 2
    assert "--zeroconf needs a tcp:// --uri" in capsys.readouterr().err


async def _discover(checkpoint: str) -> dict[str, object]:
    """Inside the namespace: start the server, browse, connect, stop it, see the record go."""
    from wyoming.client import AsyncTcpClient
    from wyoming.info import Describe, Info
    from zeroconf import ServiceStateChange, Zeroconf
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    changes: asyncio.Queue[tuple[str, ServiceStateChange]] = asyncio.Queue()

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        changes.put_nowait((name, state_change))

    async def next_change(timeout: float) -> tuple[str, ServiceStateChange]:
        return await asyncio.wait_for(changes.get(), timeout)

    browser_zeroconf = AsyncZeroconf()
    browser = AsyncServiceBrowser(browser_zeroconf.zeroconf, [SERVICE_TYPE], handlers=[on_change])
    server = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "wyoming_soprano", "--uri", f"tcp://0.0.0.0:{port}"),
        *("--model", checkpoint, "--device", "cpu", "--max-new-tokens", "24"),
        *("--zeroconf", INSTANCE),
        cwd=REPO_ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
    )
    try:
        announced = asyncio.create_task(next_change(STARTUP_TIMEOUT))
        exited = asyncio.create_task(server.wait())
        await asyncio.wait({announced, exited}, return_when=asyncio.FIRST_COMPLETED)
        assert not exited.done(), f"the server exited with {server.returncode}"
        exited.cancel()
        name, change = announced.result()
        assert change is ServiceStateChange.Added, change
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        assert await info.async_request(browser_zeroconf.zeroconf, 3000)
        addresses = info.parsed_addresses()
        client = AsyncTcpClient(addresses[0], info.port)
        await client.connect()
        await client.write_event(Describe().event())
        event = await asyncio.wait_for(client.read_event(), EVENT_TIMEOUT)
        await client.disconnect()
        assert event is not None and Info.is_type(event.type)
        program = Info.from_event(event).tts[0].name
        server.send_signal(signal.SIGTERM)
        withdrawn = await next_change(EVENT_TIMEOUT) == (name, ServiceStateChange.Removed)
        exit_code = await asyncio.wait_for(server.wait(), EVENT_TIMEOUT)
    finally:
        if server.returncode is None:
            server.kill()
        await browser.async_cancel()
        await browser_zeroconf.async_close()
    return {
        "name": name,
        "addresses": addresses,
        "port": info.port,
        "bound_port": port,
        "program": program,
        "withdrawn": withdrawn,
        "server_exit_code": exit_code,
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(_discover(sys.argv[1]))))
