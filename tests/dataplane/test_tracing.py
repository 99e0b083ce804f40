"""Tracing through a real Envoy (issue 14): spans exported over OTLP/gRPC to a collector that
receives them with the OTLP protos (the copy xds-protos ships, as Envoy's API uses them), as any
OpenTelemetry collector would. One server span per
request with the decision and usage as GenAI attributes, one client span per upstream attempt
(a failover shows both backends), and never the prompt's text."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import openai
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from tests.factories import backend, dump, model, policy, provider

from .conftest import start_gateway
from .test_lifecycle import wait_for

pytestmark = pytest.mark.dataplane
PROMPT = "a secret plan about pelicans"


# Field 2 of ResourceSpans: `scope_spans` in current OTLP, `instrumentation_library_spans` in
# older copies of the protos (the same wire format).
SCOPES = trace_pb2.ResourceSpans.DESCRIPTOR.fields_by_number[2].name


class Collector:
    """An OTLP trace receiver (TraceService/Export): keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[trace_pb2.Span] = []
        self.resources: list[dict[str, str]] = []
        self.lock = threading.Lock()

    def export(self, request: trace_service_pb2.ExportTraceServiceRequest, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                self.resources.append(attributes(resource_spans.resource))
                for scope in getattr(resource_spans, SCOPES):
                    self.spans.extend(scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def handler(self) -> grpc.GenericRpcHandler:
        export = grpc.unary_unary_rpc_method_handler(
            self.export,
            request_deserializer=trace_service_pb2.ExportTraceServiceRequest.FromString,
            response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService", {"Export": export}
        )


def attributes(item) -> dict[str, str]:
    out = {}
    for kv in item.attributes:
        value = kv.value
        out[kv.key] = str(getattr(value, value.WhichOneof("value"))) if value.WhichOneof("value") else ""
    return out


@pytest.fixture
def collector():
    servicer = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((servicer.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def test_each_request_and_each_attempt_is_a_span_with_the_decision_and_no_prompt(fakes, collector, tmp_path):
    spans_of, endpoint = collector
    resources = dump(
        provider("alpha", fakes["alpha"].url + "/v1", [model("m", inputPricePer1M=1, outputPricePer1M=1)]),
        provider("beta", fakes["beta"].url + "/v1", [model("m", inputPricePer1M=2, outputPricePer1M=2)]),
        # Decided (cost), alpha first; beta when alpha fails.
        policy("chat", ["auto"], [backend("alpha", "m"), backend("beta", "m")], strategy="cost"),
    )
    fakes["alpha"].behave(status=500, fault={"times": 1})
    gw = start_gateway(tmp_path, resources, otlp_endpoint=endpoint)
    try:
        with openai.OpenAI(base_url=gw.url, api_key="x", max_retries=0) as client:
            raw = client.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": PROMPT}], max_tokens=5
            )
            assert raw.headers["x-signalbox-provider"] == "beta"
            request_id = raw.headers["x-request-id"]

        def server_span():
            with spans_of.lock:
                return next(
                    (
                        s
                        for s in spans_of.spans
                        if s.kind == trace_pb2.Span.SPAN_KIND_SERVER and s.parent_span_id == b""
                    ),
                    None,
                )

        assert wait_for(lambda: server_span() is not None, timeout=15)
        root = server_span()
        tags = attributes(root)
        assert tags["gen_ai.request.model"] == "auto"
        assert (tags["signalbox.provider"], tags["gen_ai.response.model"]) == ("beta", "m")
        assert tags["gen_ai.provider.name"] == "openai_compatible"  # the conventions' name of its kind
        assert tags["signalbox.policy"] == "chat" and tags["signalbox.reason"]
        assert int(tags["gen_ai.usage.input_tokens"]) > 0 and int(tags["gen_ai.usage.output_tokens"]) > 0
        assert tags["signalbox.attempts"] == "2" and tags.get("guid:x-request-id", request_id) == request_id

        def attempts():
            with spans_of.lock:
                return [
                    s
                    for s in spans_of.spans
                    if s.trace_id == root.trace_id and s.parent_span_id == root.span_id and s.name.startswith("router")
                ]

        assert wait_for(lambda: len(attempts()) == 2, timeout=15), attempts()
        tried = {attributes(s)["signalbox.backend"]: attributes(s)["http.status_code"] for s in attempts()}
        assert tried == {"default/alpha/m": "500", "default/beta/m": "200"}  # each attempt, its backend
        assert all(s.kind == trace_pb2.Span.SPAN_KIND_CLIENT for s in attempts())
        assert {r.get("service.name") for r in spans_of.resources} == {"signalbox-gateway"}
        with spans_of.lock:
            exported = b"".join(s.SerializeToString() for s in spans_of.spans)
        assert PROMPT.encode() not in exported and b"pelican" not in exported

        # A caller's W3C trace context is continued: the gateway's spans join the caller's trace.
        trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        with openai.OpenAI(base_url=gw.url, api_key="x", max_retries=0) as client:
            client.chat.completions.create(
                model="auto",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=5,
                extra_headers={"traceparent": f"00-{trace_id}-{parent}-01"},
            )

        def joined():
            with spans_of.lock:
                return [s for s in spans_of.spans if s.trace_id.hex() == trace_id and s.parent_span_id.hex() == parent]

        assert wait_for(joined, timeout=15)
    finally:
        gw.stop()
