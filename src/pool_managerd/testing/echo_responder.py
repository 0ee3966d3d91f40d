"""A raw nats-py echo responder: the baseline the command benchmarks measure the daemon against.

``python -m pool_managerd.testing.echo_responder URL`` answers every request on ``bench.echo``
with its own payload and prints ``ready`` once subscribed; it runs until killed. Its own process,
as the daemon has, so both baselines pay the same hop.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

SUBJECT = "bench.echo"


def argv(url: str) -> list[str]:
    """The command line that runs the responder against the server at ``url``."""
    return [sys.executable, "-m", "pool_managerd.testing.echo_responder", url]


async def _serve(url: str) -> None:
    import nats

    nc = await nats.connect(url)

    async def echo(msg: Any) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(SUBJECT, cb=echo)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1]))
