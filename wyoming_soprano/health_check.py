"""`python -m wyoming_soprano.health_check`: exit 0 if the server answers describe with TTS.

Docker's HEALTHCHECK runs it; it checks the protocol, not just that the port is open.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from wyoming.client import AsyncClient
from wyoming.info import Describe, Info

DEFAULT_URI = "tcp://127.0.0.1:10200"
DEFAULT_TIMEOUT = 15.0


async def check(uri: str) -> str | None:
    """None if healthy, else what went wrong."""
    async with AsyncClient.from_uri(uri) as client:
        await client.write_event(Describe().event())
        while (event := await client.read_event()) is not None:
            if Info.is_type(event.type):
                programs = [p for p in Info.from_event(event).tts if p.installed]
                return None if programs else "the server advertises no installed TTS program"
    return "the server closed the connection without answering describe"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wyoming_soprano.health_check", description=__doc__)
    parser.add_argument("--uri", default=DEFAULT_URI, help="Server URI (default: %(default)s)")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="Seconds (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    try:
        problem = asyncio.run(asyncio.wait_for(check(args.uri), args.timeout))
    except (TimeoutError, OSError, ValueError) as error:
        problem = f"{type(error).__name__}: {error}"
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
