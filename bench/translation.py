"""What translating between API families costs (`make bench-translation`, issue 14).

One fake provider process answers both APIs (OpenAI's on /v1/chat/completions, Anthropic's on
/v1/messages). The gateway has one compiled alias per backend API. Chat Completions and
Messages clients are sent to each (two pairs translated per attempt by the upstream-phase
ext_proc, two untouched), Responses clients to the chat backend and chat clients to a Gemini
and a Bedrock backend (always translated; Bedrock's attempts are also SigV4-signed by Envoy and
its streams are binary event streams). Plain
Envoy forwards the same requests to the same fake. Measured for JSON answers and for streams of
100 chunks, in alternating rounds on one machine: throughput ÷ plain Envoy and the median
latency added. A second gateway without the translation filter
(`GatewayOptions.translation=False`) shows what the skipped filter costs a same-API request.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from signalbox.local import LocalGateway
from tests.factories import backend, dump, model, policy, provider

from . import dataplane

RESULTS = Path(__file__).parent / "results"
CHUNKS = 100
# (client API, path, alias): the alias names the backend's API.
PAIRS = [
    ("openai", "/v1/chat/completions", "to-openai"),
    ("openai", "/v1/chat/completions", "to-anthropic"),
    ("anthropic", "/v1/messages", "to-anthropic"),
    ("anthropic", "/v1/messages", "to-openai"),
    ("responses", "/v1/responses", "to-openai"),
    ("openai", "/v1/chat/completions", "to-gemini"),
    ("openai", "/v1/chat/completions", "to-bedrock"),
]


def _backend_api(alias: str) -> str:
    return alias.removeprefix("to-")


def resources(workdir: Path, upstream: str) -> Path:
    out = workdir / "resources"
    out.mkdir()
    # Bedrock's attempts are signed: the cost of signing is part of what is measured.
    credentials = workdir / "aws-credentials"
    credentials.write_text("[default]\naws_access_key_id = AKIABENCH\naws_secret_access_key = bench-secret\n")
    caps = {"capabilities": ["streaming", "tools"]}
    (out / "bench.yaml").write_text(
        dump(
            provider("oai", upstream + "/v1", [model("m", upstreamName="bench-model", **caps)]),
            provider("ant", upstream + "/v1", [model("m", upstreamName="bench-model", **caps)], type="anthropic"),
            provider("gem", upstream + "/v1beta", [model("m", upstreamName="bench-model", **caps)], type="gemini"),
            provider(
                "br",
                upstream,
                [model("m", upstreamName="bench.model-v1:0", **caps)],
                type="bedrock",
                aws={"region": "us-east-1"},
                auth={"file": str(credentials), "format": "aws-credentials"},
            ),
            policy("to-bedrock", ["to-bedrock"], [backend("br", "m")]),
            policy("to-openai", ["to-openai"], [backend("oai", "m")]),
            policy("to-gemini", ["to-gemini"], [backend("gem", "m")]),
            policy("to-anthropic", ["to-anthropic"], [backend("ant", "m")]),
        )
    )
    return out


def script(path: Path, api: str, alias: str, stream: bool) -> Path:
    """A wrk script posting the client API's body for `alias`."""
    system, prompt = "You are a helpful assistant.", "Summarize the plot of Hamlet in two sentences."
    messages = [{"role": "user", "content": prompt}]
    body: dict = {"model": alias, "messages": messages, "max_tokens": 64}
    if api == "anthropic":
        body["system"] = system
    elif api == "responses":
        body = {"model": alias, "instructions": system, "input": prompt, "max_output_tokens": 64}
    else:
        body["messages"] = [{"role": "system", "content": system}, *messages]
    if stream:
        body["stream"] = True
    headers = 'wrk.headers["Content-Type"] = "application/json"\n'
    if api == "anthropic":
        headers += 'wrk.headers["anthropic-version"] = "2023-06-01"\n'
    if stream:
        headers += f'wrk.headers["x-fake-chunks"] = "{CHUNKS}"\n'
    path.write_text(f'wrk.method = "POST"\n{headers}wrk.body = [[{json.dumps(body)}]]\n')
    return path


def main(argv: list[str] | None = None) -> int:
    args = dataplane.round_args(__doc__, argv)
    runs: dict[tuple[str, str, str, str], list[dict[str, float]]] = {}
    with dataplane.plain_bench("translation") as (work, upstream, plain_port):
        files = resources(work, upstream)
        for n in range(args.rounds):
            for variant in ("translation", "no-filter"):
                gateway = LocalGateway(
                    paths=[str(files)], port=0, workdir=work / f"{variant}-{n}", start_fakes=False, envoy_concurrency=1
                )
                if variant == "no-filter":
                    gateway.options = dataclasses.replace(gateway.options, translation=False)
                with dataplane.serving(gateway):
                    for api, path, alias in PAIRS:
                        if variant == "no-filter" and api != _backend_api(alias):
                            continue  # without the filter only same-API pairs can be served
                        for shape in ("json", "streamed"):
                            lua = script(work / f"{api}-{alias}-{shape}.lua", api, alias, shape == "streamed")
                            urls = (gateway.url.removesuffix("/v1") + path, f"http://127.0.0.1:{plain_port}{path}")
                            label = f"{variant:11} {api:9} -> {alias:12} {shape:8}"
                            dataplane.measure(runs, (variant, api, alias, shape), label, n, urls, args, lua)
    report = []
    for (variant, api, alias, shape), values in sorted(runs.items()):
        ratio, added, rps = dataplane.versus_plain(values)
        translated = api != _backend_api(alias)
        report.append(
            {
                "variant": variant,
                "client_api": api,
                "backend": alias,
                "shape": shape,
                "translated": translated,
                "throughput_ratio": round(ratio, 3),
                "added_p50_ms": round(added, 3),
                "rps": rps,
            }
        )
        print(
            f"{variant:11} {api:9} -> {alias:12} {shape:8} {'translated' if translated else 'same API':10} "
            f"gateway/plain {ratio:.3f}, +{added:.2f} ms p50"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "translation.json").write_text(
        json.dumps({"rounds": args.rounds, "seconds": args.seconds, "chunks": CHUNKS, "results": report}, indent=2)
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
