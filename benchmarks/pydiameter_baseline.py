"""BASELINE ONLY — not the product. A Gy server on python-diameter's own stack, for the ratio in BENCHMARKS.md.

What it is, exactly, so that the ratio means something:

- The Diameter side is python-diameter 0.9.0 as its documentation shows it: a `Node` (its own selector
  thread, peer state machine, CER/CEA, DWR/DWA, DPR/DPA, message parsing and serialising, its end-to-end
  retransmission memory) and a `SimpleThreadingApplication` for application 4, which runs every request in
  a thread of its own and returns the answer object for the node to send.
- The charging is ours and identical to `ocs serve`: a full `ocs.server.ServerApp` is started in the same
  process (same config, same Redis, CDR writer on, its own Diameter listener idle on an unused port), and the
  request thread hands the CCR to `ServerApp.credit_control.answer()` on that app's event loop
  (`run_coroutine_threadsafe`). So both servers make the same single Redis FCALL per CCR, batched per loop
  tick the same way, write the same CDRs and send byte-identical CCAs; only the Diameter stack differs.
- The glue costs the baseline a little extra: the CCR python-diameter has parsed is serialised again
  (`as_bytes`) and decoded by our lazy codec (about 10 µs), and our CCA bytes are parsed into
  python-diameter's answer object (`Message.from_bytes`) before its node serialises them. Our `validate()`
  and overload shedding are not run (python-diameter checks the AVPs it requires itself). Answers to a
  T-flag retransmission are python-diameter's own (it rejects end-to-end ids it has answered already), so
  scenarios with retransmissions are not comparable and the comparison uses none.

Run by benchmarks/compare_baseline.py; alone:

    OCS_REDIS_URL=redis://127.0.0.1:6390 .venv/bin/python benchmarks/pydiameter_baseline.py --port 3901 \\
        --peer gw1.cmp.sim --peer gw2.cmp.sim --peer-realm cmp.sim
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402
from diameter.message import Message as PdMessage  # noqa: E402
from diameter.node import Node  # noqa: E402
from diameter.node.application import SimpleThreadingApplication  # noqa: E402

from ocs.config import load_config  # noqa: E402
from ocs.server import ServerApp  # noqa: E402
from protocol.codec import decode_message  # noqa: E402

log = logging.getLogger("baseline")
APP_CREDIT_CONTROL = 4
ANSWER_TIMEOUT_SECONDS = 30.0


def build_node(app: ServerApp, loop: asyncio.AbstractEventLoop, port: int, peers: list[str],
               peer_realm: str) -> Node:
    """python-diameter's node on 127.0.0.1:port knowing `peers`; CCRs go to our credit control on `loop`."""
    diameter = app.config.diameter
    node = Node(diameter.origin_host, diameter.origin_realm, ip_addresses=["127.0.0.1"], tcp_port=port,
                vendor_ids=[10415])
    node.product_name = "pydiameter-baseline"
    known = [node.add_peer(f"aaa://{host}", realm_name=peer_realm) for host in peers]
    credit_control = app.credit_control
    assert credit_control is not None

    def handle_request(application: SimpleThreadingApplication, request: PdMessage) -> PdMessage:
        # runs in python-diameter's thread for this request
        ours = decode_message(request.as_bytes())
        future = asyncio.run_coroutine_threadsafe(credit_control.answer(ours), loop)
        return PdMessage.from_bytes(future.result(ANSWER_TIMEOUT_SECONDS))

    application = SimpleThreadingApplication(APP_CREDIT_CONTROL, is_auth_application=True,
                                             request_handler=handle_request)
    node.add_application(application, known, realms=[diameter.origin_realm])
    return node


async def serve(port: int, peers: list[str], peer_realm: str) -> None:
    config = load_config(None)
    app = ServerApp(config)
    await app.start()  # Redis, credit control, CDR writer; its own listener stays idle
    loop = asyncio.get_running_loop()
    node = build_node(app, loop, port, peers, peer_realm)
    node.start()
    log.warning("python-diameter baseline listening on 127.0.0.1:%d for %d peers", port, len(peers))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await asyncio.to_thread(node.stop, 5, True)
        await app.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--peer", action="append", required=True, help="Origin-Host of a gateway allowed in")
    parser.add_argument("--peer-realm", required=True)
    args = parser.parse_args()
    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvloop.run(serve(args.port, args.peer, args.peer_realm))


if __name__ == "__main__":
    main()
