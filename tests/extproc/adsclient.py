"""The client side of a delta ADS stream, as Envoy holds it, for tests of what the ext_proc
serves on it (endpoints: test_xds; clusters: test_cds)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from signalbox.extproc import xds


class DeltaStream:
    """Requests go out as they are queued (`send`); answers are queued as they arrive."""

    def __init__(self, channel: grpc.aio.Channel):
        self.channel = channel
        self.requests: asyncio.Queue[discovery_pb2.DeltaDiscoveryRequest | None] = asyncio.Queue()
        self.responses: asyncio.Queue[discovery_pb2.DeltaDiscoveryResponse] = asyncio.Queue()
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).DeltaAggregatedResources(self._requests())
        self.reader = asyncio.create_task(self._read())

    async def _requests(self):
        while (request := await self.requests.get()) is not None:
            yield request

    async def _read(self):
        async for response in self.call:
            await self.responses.put(response)

    def send(self, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        self.requests.put_nowait(request)

    def ask(self, type_url: str, *names: str) -> None:
        """Subscribe to `names` as well, as Envoy's on-demand CDS does for a route's chain the
        first time a request needs it (extproc.xds sends chains only then)."""
        self.send(discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, resource_names_subscribe=names))

    async def nothing(self, within: float = 4 * xds.TICK_S) -> None:
        """No answer comes within `within` seconds."""
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(self.responses.get(), within)

    def close(self) -> None:
        self.requests.put_nowait(None)
        self.reader.cancel()
