"""Announcing the server as `_wyoming._tcp.local.` so that Home Assistant discovers it.

Home Assistant drops announcements with only unspecified or link-local addresses (docs/wyoming.md),
and wyoming's own HomeAssistantZeroconf advertises the bind address, i.e. `0.0.0.0` for the usual
`tcp://0.0.0.0:10200`, and cannot withdraw its record. So the address is chosen here: an
explicit `--zeroconf-host`, else the bound address, else (bound to all interfaces) the address
of the interface that carries multicast; and the record is unregistered on shutdown.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

_LOGGER = logging.getLogger(__name__)

SERVICE_TYPE = "_wyoming._tcp.local."
MDNS_GROUP = "224.0.0.251"
MDNS_PORT = 5353


class AnnouncementError(Exception):
    """No address that a client could use could be found or was given."""


def advertised_address(bind_host: str, override: str | None) -> str:
    """The address to announce for a server bound to `bind_host`."""
    if override:
        return _usable(_resolve(override), f"--zeroconf-host {override}")
    bind_address = _resolve(bind_host) if bind_host else "0.0.0.0"
    if not ipaddress.ip_address(bind_address).is_unspecified:
        return _usable(bind_address, f"the bound address {bind_host}")
    return _usable(_multicast_interface_address(), "the detected address")


def _resolve(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return str(socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0])
    except OSError as error:
        raise AnnouncementError(f"cannot resolve {host!r}: {error}") from error


def _multicast_interface_address() -> str:
    """The local address the kernel would send mDNS from (connecting UDP sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((MDNS_GROUP, MDNS_PORT))
        except OSError as error:
            raise AnnouncementError(
                f"no network route for multicast ({error}); pass --zeroconf-host"
            ) from error
        return probe.getsockname()[0]


def _usable(address: str, source: str) -> str:
    parsed = ipaddress.ip_address(address)
    if parsed.is_unspecified or parsed.is_link_local:
        raise AnnouncementError(
            f"{source} resolves to {address}, which clients cannot connect to; "
            "pass --zeroconf-host with this machine's LAN address"
        )
    return address


class ZeroconfAnnouncer:
    """Registers one Wyoming service record and withdraws it again."""

    def __init__(self, name: str, address: str, port: int) -> None:
        self.info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{name}.{SERVICE_TYPE}",
            addresses=[ipaddress.ip_address(address).packed],
            port=port,
        )
        self._zeroconf: AsyncZeroconf | None = None

    async def register(self) -> None:
        self._zeroconf = AsyncZeroconf()
        # The first await registers the record, the second waits until it has been announced.
        await (await self._zeroconf.async_register_service(self.info, allow_name_change=True))
        _LOGGER.info(
            "Announced %s at %s:%d", self.info.name, self.info.parsed_addresses()[0], self.info.port
        )

    async def unregister(self) -> None:
        if self._zeroconf is None:
            return
        await (await self._zeroconf.async_unregister_service(self.info))  # goodbyes sent
        await self._zeroconf.async_close()
        self._zeroconf = None
        _LOGGER.info("Withdrew the zeroconf announcement")
