"""`signalbox` command line: up, validate, extproc, fake-provider.

Each subcommand is a `main(argv) -> int` so tests call them directly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import signalbox.processenv  # noqa: F401 - thread settings, before anything imports numpy
from signalbox.api.v1alpha1 import config_pb2 as pb
from signalbox.core.errors import ConfigError

USAGE_EXAMPLES = """examples:
  signalbox up -f examples/quickstart/          run the local gateway (offline example providers)
  signalbox validate -f examples/providers/     check resources, print every problem
"""


# Problems and aliases printed before a summary line says how many more there are (`--all`
# prints every one): a fleet of thousands of policies stays readable.
SHOWN = 20
# The sidecar's config-sync child, started again after it ends: the first and the longest wait,
# and how long it must have run for the wait to start over (`_config_sync_process`).
CHILD_RESTART_S = (1.0, 30.0)
CHILD_STABLE_S = 60.0
log = logging.getLogger("signalbox.cli")


def _print_problems(problems: Sequence[object], everything: bool = True) -> None:
    shown = problems if everything else problems[:SHOWN]
    for p in shown:
        print(f"  - {p}", file=sys.stderr)
    if len(shown) < len(problems):
        print(f"  ... and {len(problems) - len(shown)} more (--all prints every one)", file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    from signalbox.local import compile_files

    try:
        result = compile_files(args.file)
    except ConfigError as exc:
        print(f"invalid: {len(exc.problems)} problem(s)", file=sys.stderr)
        _print_problems(exc.problems, args.all)
        return 1
    if not result.ok:
        print(f"invalid: {len(result.problems)} problem(s)", file=sys.stderr)
        _print_problems(result.problems, args.all)
        return 1
    cfg = result.config
    assert cfg is not None
    aliases = sorted({a for p in cfg.policies for a in p.aliases})
    compiled = sum(p.compiled for p in cfg.policies)
    # Compiled: Envoy routes them alone; decided: one ext_proc message per request.
    paths = f"{compiled} compiled, {len(cfg.policies) - compiled} decided"
    listed = ", ".join(aliases) or "-"
    if len(aliases) > SHOWN and not args.all:
        listed = f"{', '.join(aliases[:SHOWN])} ... and {len(aliases) - SHOWN} more (--all lists every one)"
    print(
        f"valid: {len(cfg.providers)} provider(s), {len(cfg.backends)} backend(s), "
        f"{len(cfg.policies)} policy(ies) ({paths}); hash {cfg.content_hash[:12]}\n"
        f"{len(aliases)} alias(es): {listed}"
    )
    return 0


def local_gateway(args: argparse.Namespace):
    from signalbox.local import LocalGateway

    return LocalGateway(
        paths=args.file,
        port=args.port,
        admin_port=args.admin_port,
        workdir=Path(args.workdir) if args.workdir else None,
        failure_mode=args.failure_mode,
        max_body_bytes=args.max_body_bytes,
        accounting=not args.no_accounting,
        request_log=not args.no_request_log,
        redis_url=args.redis_url,
        capture_prompts=args.capture_prompts,
        otlp_endpoint=args.otlp_endpoint,
        trace_sampling_percent=args.trace_sampling,
        **({"upstream_ca_file": args.upstream_ca_file} if args.upstream_ca_file else {}),
    )


def _example_request(cfg: pb.RoutingConfig, url: str) -> str:
    """A curl for the first alias, in the API its backends serve: a chat completion, or an
    embedding when every backend of its policy is an embedding model (which chat would 400)."""
    alias = min(a for p in cfg.policies for a in p.aliases)
    policy = next(p for p in cfg.policies if alias in p.aliases)
    if policy.backends and all("embeddings" in cfg.backends[b.backend].capabilities for b in policy.backends):
        return (
            f"curl -s {url}/embeddings -H 'content-type: application/json' "
            + f'-d \'{{"model":"{alias}","input":"hello"}}\''
        )
    return (
        f"curl -s {url}/chat/completions -H 'content-type: application/json' "
        f'-d \'{{"model":"{alias}","messages":[{{"role":"user","content":"hello"}}]}}\''
    )


# Providers without a key named at start; a large fleet's are counted beyond these.
MISSING_KEYS_SHOWN = 5


def _warn_of_missing_keys(cfg: pb.RoutingConfig) -> None:
    """Say at start which providers have no key here (their backends are never routed to):
    otherwise a newcomer's first request gets 503 no_healthy_backend, and why is only in the
    ext_proc's log. Where each key should come from is named, never a value."""
    from signalbox.extproc.reload import key_source
    from signalbox.extproc.runtime import default_key_resolver

    resolve = default_key_resolver(None)  # `signalbox up` reads env variables and files
    missing = [p for p in cfg.providers if p.HasField("auth") and resolve(p.auth) is None]
    if not missing:
        return
    named = "; ".join(f"{p.id} ({key_source(cfg, p.id)})" for p in missing[:MISSING_KEYS_SHOWN])
    if len(missing) > MISSING_KEYS_SHOWN:
        named += f"; and {len(missing) - MISSING_KEYS_SHOWN} more (the ext_proc's log names each)"
    secrets = any(p.auth.WhichOneof("source") == "secret" for p in missing)
    print(
        f"  warning: {len(missing)} of {len(cfg.providers)} provider(s) have no API key here, so their backends "
        f"are not routed to: {named}"
        + (". `signalbox up` reads no Secrets: give such a provider `auth.env` or `auth.file`" if secrets else ""),
        file=sys.stderr,
    )


def cmd_up(args: argparse.Namespace) -> int:
    from signalbox.local import StartupCancelled, StartupError

    gateway = local_gateway(args)

    def _interrupt(*_: object) -> None:
        gateway.request_stop()

    # Stopped while it starts (a supervisor, a test giving up, Ctrl-C): what was started is
    # stopped too, never left running without its parent (SIGTERM's default would end this
    # process alone). The handlers only ask: start() stops between its steps, never between
    # starting a process and recording it.
    signal.signal(signal.SIGTERM, _interrupt)
    previous_sigint = signal.signal(signal.SIGINT, _interrupt)
    try:
        gateway.start()
    except StartupCancelled:
        return 130
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, previous_sigint)
    if gateway.stop_requested:  # asked just as the start ended
        gateway.stop()
        return 130
    cfg = gateway.config
    assert cfg is not None
    aliases = sorted({a for p in cfg.policies for a in p.aliases})
    if aliases:
        print(f"Signalbox gateway ready: {gateway.url}  (models: {', '.join(aliases)})")
        print(f"  try: {_example_request(cfg, gateway.url)}")
    else:
        print(f"Signalbox gateway ready: {gateway.url}")
        print(
            "  warning: no RoutingPolicy in the inputs, so every request gets 404 model_not_found until one is "
            "added (see examples/quickstart/policies.yaml); the inputs are watched",
            file=sys.stderr,
        )
    _warn_of_missing_keys(cfg)
    print(
        f"  admin API: {gateway.admin_url} (/metrics, /v1/models, /v1/route, /v1/budget)  envoy admin: "
        f"http://127.0.0.1:{gateway.admin_port}  work dir: {gateway.workdir}"
    )
    if gateway.options.request_log:
        print(f"  request log (a JSON line per request, summed up below): {gateway.options.request_log}")
    print("  watching the input files; Ctrl-C stops", flush=True)
    stop = {"now": False}

    def _stop(*_: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        asyncio.run(_watch_inputs(gateway, stop))
    except KeyboardInterrupt:
        pass
    finally:
        gateway.stop()
    return 0


async def _watch_inputs(gateway, stop: dict[str, bool]) -> None:
    """Recompile on every change under the inputs; a bad edit prints problems and changes nothing."""
    from watchfiles import awatch

    stop_event = asyncio.Event()

    async def poll_stop() -> None:
        while not stop["now"]:
            await asyncio.sleep(0.2)
        stop_event.set()

    poller = asyncio.create_task(poll_stop())
    tail = asyncio.create_task(_echo_requests(gateway.options.request_log)) if gateway.options.request_log else None
    troubled = False  # the last change left problems: a user waits to hear they are gone
    async for _changes in awatch(
        *gateway.paths, stop_event=stop_event, debounce=200, watch_filter=lambda _c, path: gateway.is_input(path)
    ):
        result = gateway.apply()
        was_troubled, troubled = troubled, not result.ok
        if result.ok and not result.changed:
            if was_troubled:
                print(
                    f"{time.strftime('%H:%M:%S')} no problems left; generation {gateway.generation} "
                    "(the same config) stays in force",
                    flush=True,
                )
            continue
        if result.ok:
            print(f"{time.strftime('%H:%M:%S')} applied generation {gateway.generation}", flush=True)
        else:
            print(
                f"{time.strftime('%H:%M:%S')} kept generation {gateway.generation}: {len(result.problems)} problem(s)",
                file=sys.stderr,
                flush=True,
            )
            _print_problems(result.problems)
    poller.cancel()
    if tail is not None:
        tail.cancel()


def request_summary(entry: dict) -> str:
    """One console line of a request log entry: `signalbox up` shows where each request went."""
    at = datetime.fromisoformat(entry["time"].replace("Z", "+00:00")).astimezone().strftime("%H:%M:%S")
    if entry.get("event") == "attempt":
        # One try of a request at one backend (its request's own line follows when it ends).
        status = entry["status"] or "no response"
        flags = f" {entry['flags']}" if entry.get("flags") not in (None, "-") else ""
        return f"{at}   attempt -> {entry['backend']}  {status}{flags}  {entry['duration_ms']} ms"
    if entry.get("policy") is None:
        # Not a routing decision at all (e.g. GET /v1/models, answered by the gateway itself).
        what = entry.get("reason") or ("answered by the gateway" if int(entry["status"]) < 400 else "refused")
        return f"{at} {entry['status']} {entry['method']} {entry['path']}  {what}  {entry['duration_ms']} ms"
    line = f"{at} {entry['status']} {entry['method']} {entry['path']}  {entry['policy']} -> "
    line += f"{entry['provider']}/{entry['model']}" if entry["provider"] not in (None, "none") else "none"
    line += f"  {entry['reason']}  {entry['duration_ms']} ms"
    if entry.get("prompt_tokens") is not None:
        line += f"  {entry['prompt_tokens']}+{entry['completion_tokens']} tokens"
    return line


async def _echo_requests(path: str, every: float = 0.5) -> None:
    """Print a summary of each new line of the request log (Envoy flushes it every second)."""
    import json

    log = Path(path)
    offset = log.stat().st_size if log.exists() else 0  # a reused workdir: only this run's requests
    pending = b""
    while True:
        await asyncio.sleep(every)
        if not log.exists() or log.stat().st_size <= offset:
            continue
        with log.open("rb") as f:
            f.seek(offset)
            chunk = f.read()
        offset += len(chunk)
        *lines, pending = (pending + chunk).split(b"\n")
        for raw in lines:
            try:
                print(request_summary(json.loads(raw)), flush=True)
            except (ValueError, KeyError, TypeError):
                continue  # not a line of ours: never stop echoing over it


def cmd_replay(args: argparse.Namespace) -> int:
    """Recorded requests (`--capture-prompts`) through a candidate config, offline."""
    import json

    from signalbox import replay
    from signalbox.extproc.runtime import RuntimeTable
    from signalbox.local import compile_files

    tables: list[RuntimeTable | None] = []
    for files in (args.file, args.before):
        if not files:
            tables.append(None)
            continue
        result = compile_files(files)
        if result.config is None:
            _print_problems(result.problems)
            return 1
        tables.append(RuntimeTable.from_config(result.config))
    after, before = tables
    assert after is not None
    try:
        records = replay.load(args.log)
        scores = replay.load_scores(args.scores) if args.scores else None
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    decisions: list[dict] | None = [] if args.decisions else None
    report = replay.run(records, after, before, decisions, scores)
    print(replay.table(report))
    if decisions is not None:
        Path(args.decisions).write_text("".join(json.dumps(d) + "\n" for d in decisions))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        replay.plot(report, args.plot)
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    """Batch decisions with the ext_proc's own code: one JSON object per input line."""
    import json

    from signalbox.core.errors import RequestError
    from signalbox.extproc.decide import decide
    from signalbox.extproc.runtime import RuntimeTable
    from signalbox.extproc.strategies import SelectionState
    from signalbox.local import compile_files

    result = compile_files(args.file)
    if result.config is None:
        _print_problems(result.problems)
        return 1
    table = RuntimeTable.from_config(result.config)
    alias = args.model or table.aliases[0]
    state = SelectionState()
    try:
        lines = Path(args.input).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: cannot read {args.input}: {exc}", file=sys.stderr)
        return 1
    out = []
    failed = 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            outcome = decide(table, state, "/v1/chat/completions", {}, _classify_body(line, alias))
        except (ValueError, RequestError) as exc:
            # One bad line is reported where it stands; the others are still classified.
            failed += 1
            print(f"{args.input}:{n}: {exc}", file=sys.stderr)
            out.append(json.dumps({"line": n, "error": str(exc)}))
            continue
        c = outcome.classification
        out.append(
            json.dumps(
                {
                    "line": n,
                    "policy": outcome.policy.name,
                    "class": c.class_key,
                    "task_type": c.task_type,
                    "complexity": c.complexity,
                    "tier": c.tier,
                    "confidence": c.confidence,
                    "backend": outcome.selection.choice.backend.id,
                    "reason": outcome.selection.reason,
                }
            )
        )
    Path(args.output).write_text("\n".join(out) + "\n")
    print(f"{len(out) - failed} decisions written to {args.output}" + (f"; {failed} line(s) failed" if failed else ""))
    return 1 if failed else 0


def _classify_body(line: str, alias: str) -> bytes:
    """An input line of `signalbox classify` as the request body the gateway would route:
    `{"prompt": ...}` or an OpenAI request body; ValueError says why a line is neither."""
    import json

    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object per line ({'prompt': ...} or an OpenAI request body)")
    if "messages" in record:
        body = dict(record)
    elif isinstance(record.get("prompt"), str):
        body = {"messages": [{"role": "user", "content": record["prompt"]}]}
    else:
        raise ValueError("a line needs a string 'prompt' or a 'messages' array")
    body["model"] = alias
    return json.dumps(body).encode()


def cmd_eval_routing(args: argparse.Namespace) -> int:
    import json

    from signalbox import evaluation

    prices = evaluation.load_prices(args.prices)
    per_prompt = not args.class_only
    if args.train or args.test:
        if not (args.train and args.test) or args.data:
            print("error: --train and --test go together, instead of --data", file=sys.stderr)
            return 2
        train, test = evaluation.load_items(args.train), evaluation.load_items(args.test)
        report = evaluation.evaluate_split(
            train, test, prices, clusters=args.clusters, seed=args.seed, per_prompt=per_prompt
        )
    elif args.data:
        items = evaluation.load_items(args.data)
        report = evaluation.evaluate(
            items, prices, folds=args.folds, clusters=args.clusters, seed=args.seed, per_prompt=per_prompt
        )
    else:
        print("error: give --data (K folds) or --train and --test (a fixed split)", file=sys.stderr)
        return 2
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        evaluation.plot(report, args.plot)
    print(evaluation.describe(report))
    return 0


def cmd_extproc(args: argparse.Namespace) -> int:
    from signalbox.extproc.main import run

    return run(args)


def cmd_operator(args: argparse.Namespace) -> int:
    from signalbox.operator.main import run

    return run(args)


def pod_options(args: argparse.Namespace):
    from signalbox import pod

    return pod.options(
        args.workdir,
        args.failure_mode,
        args.max_body_bytes,
        args.listen_port,
        args.health_port,
        args.admin_port,
        admin_socket=getattr(args, "admin_socket", ""),
        accounting=not args.no_accounting,
        request_log=not args.no_request_log,
        otlp_endpoint=args.otlp_endpoint,
        trace_sampling_percent=args.trace_sampling,
        **({"upstream_ca_file": args.upstream_ca_file} if args.upstream_ca_file else {}),
    )


def _config_sync(args: argparse.Namespace):
    from signalbox.configsync import ConfigSync
    from signalbox.operator.kube import api_client

    namespace, _, name = args.configmap.partition("/")
    return ConfigSync(api_client(args.server), namespace, name, Path(args.workdir), pod_options(args))


def cmd_config_sync(args: argparse.Namespace) -> int:
    """The ConfigMap watch (and, given `--replica-configmap`, the replicas' shared state): the
    gateway sidecar's child, or `--once` the init container. Ends non-zero when either job ends
    before it is asked to stop, so its parent (or the kubelet) knows."""
    from signalbox import parentwatch
    from signalbox.gatewayfiles import STATE_DIR

    sync = _config_sync(args)
    if args.once:
        sync.initialize()
        return 0

    async def run() -> int:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        jobs = [asyncio.create_task(sync.run(stop), name="config-sync")]
        if args.replica_configmap:
            args.state_dir = args.state_dir or f"{args.workdir}/{STATE_DIR}"
            jobs.append(asyncio.create_task(_replica_sync(args).run(stop), name="replica-sync"))
        if args.parent_pid:
            jobs.append(asyncio.create_task(parentwatch.stop_with_parent(args.parent_pid, stop), name="parent"))
        done, _ = await asyncio.wait(jobs, return_when=asyncio.FIRST_COMPLETED)
        early = [t.get_name() for t in done if t.get_name() != "parent" and not stop.is_set()]
        stop.set()
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for task, result in zip(jobs, results, strict=True):
            if isinstance(result, BaseException):
                log.critical("%s failed: %r", task.get_name(), result)
                early.append(task.get_name())
        if early:
            log.critical("stopping: %s ended while serving", ", ".join(sorted(set(early))))
        return 1 if early else 0

    return asyncio.run(run())


def _pod_argv(args: argparse.Namespace) -> list[str]:
    """The pod arguments `args` holds, as a command line (`_pod_arguments`'s options)."""
    parser = argparse.ArgumentParser(add_help=False)
    _pod_arguments(parser)
    out = []
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if isinstance(action, argparse._StoreTrueAction):
            out += [action.option_strings[0]] if value else []
        elif value not in (None, ""):
            out.append(f"{action.option_strings[0]}={value}")
    return out


def _config_sync_process(args: argparse.Namespace):
    """The ConfigMap watch and everything it writes, and the replicas' shared state, in a child
    process of the sidecar (`signalbox config-sync --parent-pid`), as `signalbox up` publishes
    from a process of its own.

    Why not in the ext_proc's own process (as before): at the 2,000-provider fleet, making
    Envoy's files took the process that decides requests from 67 to 165 MB (what the generator
    keeps to convert a change's parts alone), and the Kubernetes client's import 55 MB more,
    where issue 12 holds an ext_proc worker to 100 MB; and each change's second of generation
    competed for the GIL with the requests being decided. The container holds both processes:
    its memory is about one interpreter's more (bench/README.md).

    A child that ends while the sidecar serves (killed by the container's memory limit, a bug)
    is started again, after 1 s doubling to 30 s while it keeps ending within a minute: the
    ext_proc serves on with the config in force meanwhile, where stopping it would leave the
    pod's decided requests unanswered until the kubelet restarted the container. The child
    stops when the sidecar does, or within a second of the sidecar dying (`--parent-pid`)."""
    argv = [sys.executable, "-m", "signalbox.cli", "config-sync", *_pod_argv(args)]
    argv += [f"--max-body-bytes={args.max_body_bytes}", f"--log-level={args.log_level}", f"--parent-pid={os.getpid()}"]
    argv += [f"--state-dir={args.state_dir}"] if args.state_dir else []

    async def config_sync(stop: asyncio.Event) -> None:
        delay = CHILD_RESTART_S[0]
        while True:
            started = time.monotonic()
            child = await asyncio.create_subprocess_exec(*argv)
            ended = asyncio.create_task(child.wait())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({ended, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                if not ended.done():
                    child.terminate()
                await ended
                return
            stopped.cancel()
            if time.monotonic() - started > CHILD_STABLE_S:
                delay = CHILD_RESTART_S[0]
            log.error("config sync ended with exit code %s: starting it again in %.0f s", child.returncode, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return
            delay = min(delay * 2, CHILD_RESTART_S[1])

    return config_sync


def cmd_gateway_sidecar(args: argparse.Namespace) -> int:
    """The gateway pod's second container: the ext_proc, and the ConfigMap watch in a child
    process (`_config_sync_process`)."""
    from signalbox.core.envoygen import contract, resource_file
    from signalbox.extproc.main import serve_until_stopped
    from signalbox.gatewayfiles import CONFIG_FILE, ENVOY_DIR, SECRETS_DIR, STATE_DIR

    args.config = f"{args.workdir}/{CONFIG_FILE}"
    args.socket = f"{args.workdir}/extproc.sock"
    args.secrets_dir = args.secrets_dir or f"{args.workdir}/{SECRETS_DIR}"
    args.state_dir = args.state_dir or f"{args.workdir}/{STATE_DIR}"
    args.outlier_events = args.outlier_events or f"{args.workdir}/{contract.OUTLIER_EVENTS_FILE}"
    args.clusters = args.clusters or resource_file(f"{args.workdir}/{ENVOY_DIR}", "cds.json")
    return asyncio.run(serve_until_stopped(args, background=(_config_sync_process(args),)))


def _replica_sync(args: argparse.Namespace):
    """Budget spend, learning, cooldowns and rollout figures shared with the other gateway replicas
    through a ConfigMap."""
    from signalbox.extproc.cooldown import Cooldowns
    from signalbox.extproc.learning import SharedLearning
    from signalbox.extproc.ledger import SpendLedger
    from signalbox.extproc.rolloutstats import RolloutStats
    from signalbox.extproc.sharedstate import COOLDOWN_DB, LEARNING_DB, ROLLOUT_DB, SPEND_DB
    from signalbox.operator.kube import api_client
    from signalbox.replicasync import ReplicaSync

    namespace, _, name = args.replica_configmap.rpartition("/")
    replica = args.replica or os.environ.get("POD_NAME") or socket.gethostname()
    state = Path(args.state_dir)
    return ReplicaSync(
        api_client(args.server),
        namespace or "default",
        name,
        replica,
        SpendLedger(state / SPEND_DB),
        SharedLearning(state / LEARNING_DB),
        interval=args.replica_sync_interval,
        cooldowns=Cooldowns(state / COOLDOWN_DB),
        rollouts=RolloutStats(state / ROLLOUT_DB),
    )


def cmd_envoy_drain(args: argparse.Namespace) -> int:
    """Envoy's preStop: stop accepting new connections, let in-flight requests finish."""
    import urllib.request

    from signalbox import pod

    url = f"http://127.0.0.1:{pod.ADMIN_PORT}/drain_listeners?graceful&inboundonly"
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=2).close()
    except OSError as exc:
        print(f"drain request failed ({exc}); waiting anyway", file=sys.stderr)
    time.sleep(args.seconds)
    return 0


def cmd_fake_provider(argv: list[str]) -> int:
    from signalbox.fakeprovider import main

    return main(argv)


def _extproc_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--secrets-dir", help="Secrets mounted as <dir>/<namespace>/<name>/<key>")
    parser.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024)
    parser.add_argument("--health-address", help="host:port for a gRPC health service only (kubelet probes)")
    parser.add_argument("--admin-address", help="host:port of the admin HTTP API (/metrics, /v1/route, ...)")
    parser.add_argument("--admin-address-file", help="write the admin API's bound host:port here (for port 0)")
    parser.add_argument(
        "--admin-token-file",
        help="token that /v1/classify, /v1/route and /v1/feedback on the admin API require as a Bearer token "
        "(without one they are off whenever --admin-address is not loopback)",
    )
    parser.add_argument(
        "--state-dir",
        help="directory of the state the workers of one gateway share: budget spend, learning (default: in memory)",
    )
    parser.add_argument(
        "--decision-key-file",
        help="key that signs x-signalbox-decision tokens, shared by every worker and replica "
        "(default: <state-dir>/decision.key, made on first start; without a state dir a random key per process)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("SIGNALBOX_REDIS_URL", ""),
        help="limit store shared by every replica (redis:// or rediss:// for TLS; password from "
        "$SIGNALBOX_REDIS_PASSWORD); default $SIGNALBOX_REDIS_URL, else per replica in --state-dir",
    )
    parser.add_argument(
        "--capture-prompts",
        default="",
        help="append each routed request (body capped and redacted of key-like strings) to this JSONL file, "
        "for `signalbox replay` (off by default)",
    )
    parser.add_argument(
        "--outlier-events",
        default="",
        help="Envoy's outlier event log: its ejections become rests shown in /v1/models, metrics and "
        "AIProvider status (one ext_proc worker per gateway reads it)",
    )
    parser.add_argument(
        "--clusters",
        default="",
        help="Envoy's clusters as the publisher writes them (a binary DiscoveryResponse): served to Envoy "
        "over its ADS stream, only what changed (GatewayOptions.endpoints_over_ads)",
    )
    parser.add_argument(
        "--parent-pid",
        type=int,
        default=0,
        help="stop when this process (the `signalbox up` that started this worker) is gone, even if it "
        "could not stop us (killed): a worker never outlives its gateway",
    )
    parser.add_argument("--log-level", default="info")


def _otlp_endpoint(text: str) -> str:
    from signalbox.core.envoygen.tracing import host_port

    if text:
        try:
            host_port(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _percent(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{text} is not a percentage (0-100)")
    return value


def _tracing_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--otlp-endpoint",
        type=_otlp_endpoint,
        default=os.environ.get("SIGNALBOX_OTLP_ENDPOINT", ""),
        help="host:port of an OpenTelemetry collector (OTLP/gRPC): Envoy sends a span per request and per "
        "upstream attempt, the decision as attributes, never prompt text (default $SIGNALBOX_OTLP_ENDPOINT)",
    )
    parser.add_argument("--trace-sampling", type=_percent, default=100.0, help="percent of requests traced")
    parser.add_argument(
        "--upstream-ca-file",
        default="",
        help="CA bundle that providers' TLS certificates are verified against (default: the system's; "
        "a file of private CAs for providers behind an internal TLS endpoint)",
    )


def _pod_arguments(parser: argparse.ArgumentParser) -> None:
    """Ports and paths are the pod's fixed layout (signalbox.pod), shared with the chart's bootstrap."""
    from signalbox import pod

    parser.add_argument("--configmap", default="signalbox-system/signalbox-routing", help="NAMESPACE/NAME")
    parser.add_argument("--workdir", default=pod.WORKDIR, help="directory shared with Envoy")
    parser.add_argument("--failure-mode", choices=["closed", "open"], default="closed")
    parser.add_argument("--no-accounting", action="store_true", help="do not count tokens and cost (faster)")
    parser.add_argument("--no-request-log", action="store_true", help="no JSON line per request on Envoy's stdout")
    parser.add_argument("--server", help="Kubernetes API URL (default: in-cluster config)")
    parser.add_argument(
        "--replica-configmap",
        default="",
        help="NAMESPACE/NAME of the ConfigMap through which replicas share budget spend and learning",
    )
    parser.add_argument("--replica-sync-interval", type=float, default=2.0, help="seconds between publications")
    parser.add_argument("--replica", help="this replica's key in that ConfigMap (default: $POD_NAME)")
    parser.add_argument("--listen-port", type=int, default=pod.LISTEN_PORT, help=argparse.SUPPRESS)
    parser.add_argument("--health-port", type=int, default=pod.HEALTH_PORT, help=argparse.SUPPRESS)
    parser.add_argument("--admin-port", type=int, default=pod.ADMIN_PORT, help=argparse.SUPPRESS)
    parser.add_argument("--admin-socket", default="", help=argparse.SUPPRESS)
    _tracing_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="signalbox",
        description="Route LLM traffic with Envoy.",
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the local gateway (Envoy + ext_proc) on YAML files")
    up.add_argument("-f", "--file", action="append", required=True, help="YAML file or folder (repeatable)")
    up.add_argument("--port", type=int, default=8080, help="gateway port (default 8080; 0 picks one)")
    up.add_argument("--admin-port", type=int, default=0, help="Envoy admin port (default: a free one)")
    up.add_argument("--workdir", help="where generated config is written (default: a temp dir)")
    up.add_argument(
        "--failure-mode",
        choices=["closed", "open"],
        default="closed",
        help="when the ext_proc is unreachable: closed answers 503 (default), open forwards",
    )
    up.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024)
    up.add_argument(
        "--capture-prompts",
        action="store_true",
        help="record routed requests in <workdir>/captured.jsonl for `signalbox replay` (bodies capped, keys redacted)",
    )
    up.add_argument(
        "--redis-url",
        default=os.environ.get("SIGNALBOX_REDIS_URL", ""),
        help="Redis holding consumer and policy limit counters (default: embedded, this gateway only)",
    )
    up.add_argument("--no-accounting", action="store_true", help="do not count tokens and cost (faster)")
    up.add_argument("--no-request-log", action="store_true", help="do not write <workdir>/requests.log")
    _tracing_arguments(up)
    up.set_defaults(func=cmd_up)

    val = sub.add_parser("validate", help="compile resources and print every problem")
    val.add_argument("-f", "--file", action="append", required=True, help="YAML file or folder (repeatable)")
    val.add_argument("--all", action="store_true", help=f"list every alias and problem (default: the first {SHOWN})")
    val.set_defaults(func=cmd_validate)

    rp = sub.add_parser("replay", help="recorded requests (--capture-prompts) through a candidate config, offline")
    rp.add_argument("--log", required=True, help="the capture: <workdir>/captured.jsonl, or --capture-prompts FILE")
    rp.add_argument("-f", "--file", action="append", required=True, help="candidate resources (repeatable)")
    rp.add_argument(
        "--before",
        action="append",
        help="the resources that served the capture (prices of the recorded backends; default: the candidate's)",
    )
    rp.add_argument("--output", help="the report as JSON")
    rp.add_argument(
        "--scores",
        help="eval-routing's JSONL ({prompt, scores: {model: 0..1}}): adds the quality trade-off of scored requests",
    )
    rp.add_argument(
        "--decisions",
        help="JSON lines, one per request: its recorded and replayed backend, the policy that decided, the rollout",
    )
    rp.add_argument("--plot", help="PNG: estimated cost by policy, recorded against candidate")
    rp.set_defaults(func=cmd_replay)

    cl = sub.add_parser("classify", help="classify and route prompts offline with the ext_proc's code")
    cl.add_argument("-f", "--file", action="append", required=True, help="providers + policy YAML (repeatable)")
    cl.add_argument("--input", required=True, help="JSONL: {'prompt': ...} or an OpenAI request body per line")
    cl.add_argument("--output", required=True, help="JSONL decisions")
    cl.add_argument("--model", help="policy alias to route with (default: the first)")
    cl.set_defaults(func=cmd_classify)

    ev = sub.add_parser("eval-routing", help="cost-quality evaluation of adaptive routing on a scored dataset")
    ev.add_argument("--data", help="JSONL: {'prompt': str, 'scores': {model: 0..1}}, evaluated in K folds")
    ev.add_argument("--train", help="a fixed split instead of folds: learn on this JSONL file...")
    ev.add_argument("--test", help="...and route this one")
    ev.add_argument("--prices", required=True, help="JSON: {model: {'input': USD/1M, 'output': USD/1M}}")
    ev.add_argument("--folds", type=int, default=5)
    ev.add_argument("--clusters", type=int, default=24, help="semantic classes learned from training prompts")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument(
        "--class-only", action="store_true", help="learn per class only (learning.perPrompt: false), for comparison"
    )
    ev.add_argument("--output", default="eval/results/routing.json")
    ev.add_argument("--plot", help="PNG cost-quality curve")
    ev.set_defaults(func=cmd_eval_routing)

    ext = sub.add_parser("extproc", help="run the ext_proc server alone")
    ext.add_argument("--config", required=True, help="compiled RoutingConfig JSON (watched)")
    from signalbox.extproc.sharedstate import DEFAULT_EXTPROC_SOCKET

    ext.add_argument("--socket", help=f"Unix socket path to listen on (the default, at {DEFAULT_EXTPROC_SOCKET})")
    ext.add_argument(
        "--address",
        help="host:port to listen on TCP instead of the socket (its answers carry provider keys: keep it on loopback)",
    )
    ext.add_argument("--no-accounting", action="store_true", help="Envoy reports no usage: hold no budget")
    _extproc_arguments(ext)
    ext.set_defaults(func=cmd_extproc)

    side = sub.add_parser(
        "gateway-sidecar", help="gateway pod: ext_proc, and the routing ConfigMap's watch in a child process"
    )
    _pod_arguments(side)
    _extproc_arguments(side)
    side.set_defaults(func=cmd_gateway_sidecar)

    op = sub.add_parser("operator", help="run the Kubernetes operator (kopf)")
    from signalbox.operator.arguments import add_arguments

    add_arguments(op)
    op.set_defaults(func=cmd_operator)

    cs = sub.add_parser("config-sync", help="gateway pod: watch the routing ConfigMap, write Envoy/ext_proc files")
    _pod_arguments(cs)
    cs.add_argument("--once", action="store_true", help="write the files once and exit (init container)")
    cs.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024)
    cs.add_argument("--log-level", default="info")
    cs.add_argument("--parent-pid", type=int, default=0, help="stop when this process is no longer the parent")
    cs.add_argument("--state-dir", default="", help="the ext_proc's shared state (default: <workdir>/state)")
    cs.set_defaults(func=cmd_config_sync)

    drain = sub.add_parser("envoy-drain", help="gateway pod: drain Envoy's listeners, then wait (preStop)")
    drain.add_argument("--seconds", type=int, default=15)
    drain.set_defaults(func=cmd_envoy_drain)

    sub.add_parser("fake-provider", help="run the bundled OpenAI-compatible fake provider", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fake-provider"]:
        return cmd_fake_provider(argv[1:])
    args = build_parser().parse_args(argv)
    level = getattr(args, "log_level", "info").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":
        # httpx logs every request at INFO: the gateway's own polls of Envoy's admin API, not news;
        # watchfiles each change it saw, which `signalbox up` reports itself (applied or kept).
        for noisy in ("httpx", "watchfiles"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    return int(args.func(args))


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
