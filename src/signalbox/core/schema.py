"""What the compiled RoutingConfig promises its readers, without the compiler.

The data plane (ext_proc, config-sync) reads compiled configs; importing the compiler for two
constants would load pydantic and every resource model into each ext_proc worker (about
20 MB and 90 ms of import, issue 12). The compiler imports these from here.
"""

from __future__ import annotations

from signalbox.api.v1alpha1 import config_pb2 as pb
from signalbox.core.errors import ANTHROPIC_API, BEDROCK_API, GEMINI_API, OPENAI_API

# The RoutingConfig layout this code writes and reads; a reader refuses any other.
SCHEMA_VERSION = 2

# Strategy enum value -> the name a RoutingPolicy spells (`spec.strategy`): the proto's name
# in lower case with dashes (ROUND_ROBIN -> round-robin); a unit test holds it to the CRD's.
STRATEGY_NAMES: dict[int, str] = {
    v.number: v.name.lower().replace("_", "-") for v in pb.Strategy.DESCRIPTOR.values if v.number
}
# BrokenStream enum value -> `failover.onBrokenStream` (BROKEN_STREAM_ERROR -> error).
BROKEN_STREAM_NAMES: dict[int, str] = {
    v.number: v.name.removeprefix("BROKEN_STREAM_").lower() for v in pb.BrokenStream.DESCRIPTOR.values
}

# The API family each provider type speaks (OpenAI's chat for every type not listed).
_PROVIDER_APIS: dict[int, str] = {pb.ANTHROPIC: ANTHROPIC_API, pb.GEMINI: GEMINI_API, pb.BEDROCK: BEDROCK_API}


# `gen_ai.provider.name` of the OpenTelemetry GenAI conventions for each provider type: their
# well-known values, and a name of our own for servers that only speak OpenAI's API.
_GENAI_PROVIDER_NAMES: dict[int, str] = {
    pb.OPENAI: "openai",
    pb.AZURE_OPENAI: "azure.ai.openai",
    pb.ANTHROPIC: "anthropic",
    pb.GEMINI: "gcp.gemini",
    pb.BEDROCK: "aws.bedrock",
    pb.OPENAI_COMPATIBLE: "openai_compatible",
}


# How long Envoy keeps an idle connection to a provider when its spec does not say
# (`idleTimeoutMs`). Below the server's own keep-alive, so the server never closes a connection
# Envoy may be handing a request (that request fails unanswered: a 503 with one backend, a
# needless failover with more). Plain HTTP is mostly self-hosted servers: vLLM's, SGLang's and
# LiteLLM's uvicorn and llama.cpp's server close idle connections after 5 s, and a new
# connection in the cluster costs next to nothing. Over HTTPS a new connection costs a TLS
# handshake, and hosted APIs' load balancers keep theirs 60 s or more (AWS's ALB: 60 s).
PLAIN_IDLE_TIMEOUT_MS = 4000
TLS_IDLE_TIMEOUT_MS = 50000


def idle_timeout_ms(provider: pb.Provider) -> int:
    """The idle timeout of Envoy's connections to `provider`: its spec's `idleTimeoutMs`, else
    (0 in the compiled config) the default for its scheme."""
    return provider.idle_timeout_ms or (TLS_IDLE_TIMEOUT_MS if provider.tls else PLAIN_IDLE_TIMEOUT_MS)


def genai_provider_name(provider_type: int) -> str:
    return _GENAI_PROVIDER_NAMES.get(provider_type, "openai_compatible")


def provider_api(provider_type: int) -> str:
    """The API family a provider of this type speaks: "openai", "anthropic", "gemini" or "bedrock"."""
    return _PROVIDER_APIS.get(provider_type, OPENAI_API)
