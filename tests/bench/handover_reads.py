"""How often a handed-over answer reaches the sibling whole, in one read: natively, in one process.

The owner holds an answer's frames for up to ``handover.COALESCE_SECONDS`` and writes them together;
the sibling then finds the whole answer in one read and never starts the task that tells the owner
when the client leaves (``handover._exchange``). This counts, for a handshake-era ``tools/call``
(``whoami``) handed over between two layers of the demo app over a real Unix socket, the share of
calls whose answer did not arrive whole (the watch had to start). Under callgrind the code runs
about 50 times slower and the hold runs out first, so ``instructions.py`` stretches it as much.

Command::

    .venv/bin/python -m tests.bench.handover_reads [--calls 500]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import Any

from tests.bench import layer, mcp_load

TOOL = "whoami"
WARM_UP_CALLS = 50


async def _count(calls: int) -> dict[str, Any]:
    layer._set_machine_environment()  # before app.main is imported (bare_app imports it too)
    from app import main
    from fly_replay_router.affinity import handover
    from fly_replay_router.affinity.middleware import AffinityMiddleware
    from tests.bench import bare_app

    layer._quiet_sdk_logs()
    watches = 0
    send_request = handover._send_request

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal watches
        watches += 1
        return send_request(*args, **kwargs)

    lifespan = mcp_load.Lifespan(bare_app.app)  # the session manager the demo's routes use
    await lifespan.start()
    sibling = AffinityMiddleware(main.mcp_app, settings=main.settings)
    handover._send_request = counted  # type: ignore[assignment]
    try:
        token = await mcp_load.AsgiClient(main.layer).open_session()
        handed = functools.partial(mcp_load.AsgiClient(sibling).call_tool, token, tool=TOOL)
        for index in range(WARM_UP_CALLS):
            await handed(index)
        watches = 0
        for index in range(calls):
            await handed(index)
    finally:
        handover._send_request = send_request
        await sibling.workers.stop()
        await lifespan.stop()
    return {"calls": calls, "answers_not_whole": watches, "share_not_whole": watches / calls}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.handover_reads", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args(argv)
    import uvloop

    print(json.dumps(uvloop.run(_count(args.calls))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
