"""The ceiling of any grpc.aio ext_proc: a processor that decides nothing.

    python -m bench.noop_extproc --socket /tmp/noop.sock

It answers the one request-headers message of each stream with an empty "continue", so the
bench's `noop_extproc` target (plain Envoy + this filter) measures what one Python gRPC round
trip per request costs Envoy's throughput before any routing code runs. Signalbox cannot be
faster than this with the same number of messages per request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

_CONTINUE = ep.ProcessingResponse(request_headers=ep.HeadersResponse())


class Noop(ep_grpc.ExternalProcessorServicer):
    async def Process(self, request_iterator, context):
        async for _ in request_iterator:
            yield _CONTINUE
            return


async def serve(socket: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket)
    server = grpc.aio.server()
    ep_grpc.add_ExternalProcessorServicer_to_server(Noop(), server)
    server.add_insecure_port(f"unix:{socket}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True)
    asyncio.run(serve(parser.parse_args().socket))
