"""Holds the current RuntimeTable and hot-reloads it from the compiled config file.

The file is the RoutingConfig in protobuf JSON: written by `signalbox up` locally and by the
operator's ConfigMap in a cluster (a mounted ConfigMap changes through a `..data` symlink swap,
so the whole directory is watched, not the file). A file that cannot be read, parsed or
understood never replaces the table in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from google.protobuf import json_format

from signalbox.api.v1alpha1 import config_pb2 as pb

from .memtrim import release_free_memory
from .metrics import Metrics
from .runtime import KeyResolver, PolicyRuntime, RuntimeTable, default_key_resolver

log = logging.getLogger("signalbox.extproc")

# How long the table before the one in force still decides requests that arrived under its
# routes, once Envoy has the new ones (`TableHolder.for_routes`): a request's body reaches the
# router phase milliseconds after its headers, or as long as a slow client takes to send it.
PREVIOUS_KEPT_S = 30.0


class TableHolder:
    def __init__(
        self,
        table: RuntimeTable | None = None,
        resolve_key: KeyResolver | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.current = table or RuntimeTable.empty()
        self.resolve_key = resolve_key or default_key_resolver()
        self.metrics = metrics
        self.reload_failures = 0
        # Why the newest config is not in force ("" when it is): /healthz reports it.
        self.last_error = ""
        # Whether any config was ever installed (readiness), and who wants to know when one is.
        self.loaded = table is not None
        self.on_install: list[Callable[[], object]] = []
        # The table before the one in force, while Envoy's routes may still be its config's and
        # the change gave a policy a target they lack (`for_routes`), and until when it is kept
        # once they are not.
        self.previous: RuntimeTable | None = None
        self._previous_until = float("inf")
        self.clock = clock
        # The file the table in force was built from, as stat saw it before reading it.
        self._built_from: tuple[int, ...] | None = None
        self._failed_on: tuple[int, ...] | None = None

    def install(self, cfg: pb.RoutingConfig) -> RuntimeTable:
        table = RuntimeTable.from_config(cfg, self.resolve_key, reuse=self.current)
        return self._use(table, key_sources(cfg, table))

    def _use(self, table: RuntimeTable, sources: dict[str, str]) -> RuntimeTable:
        """Put `table` in force (`sources`: where each provider without a key should get it)."""
        if self.loaded and routes_differ(self.current, table):
            self.previous, self._previous_until = self.current, float("inf")
        self.current = table
        self.loaded = True
        for notify in self.on_install:
            notify()
        missing = table.providers_without_key
        for provider in missing:
            # Once per load (a load happens when the config or a key changes), not per request.
            log.warning(
                "provider %s: its API key cannot be read (%s); its backends are not routed to until it can",
                provider.id,
                sources.get(provider.id, "unknown source"),
            )
        if self.metrics is not None:
            self.metrics.config_generation.set(table.generation)
            self.metrics.providers_without_key.set(len(missing))
        return table

    def for_routes(self, key: str) -> RuntimeTable:
        """The table to decide a request by, given the routes key of the config whose routes it
        arrived under (wire.routes_key: Envoy keeps those routes for the whole request). A change
        reaches the workers before Envoy's routes, so a request can arrive under the routes of the
        config before the one in force: decided by that config, its decision has a route (by
        the one in force, a policy's new target had none: a 503 until the routes came). The
        previous table is kept only when the change needs it (`routes_differ`), until
        PREVIOUS_KEPT_S after the first request that arrived under the routes of the one in
        force. Any other config (unknown, or a worker behind Envoy): the table in force."""
        current = self.current
        if key == current.routes_key:
            if self.previous is not None and self._previous_until == float("inf"):
                self._previous_until = self.clock() + PREVIOUS_KEPT_S
                with contextlib.suppress(RuntimeError):  # no event loop: dropped when next asked
                    asyncio.get_running_loop().call_later(PREVIOUS_KEPT_S, self._drop_previous)
            return current
        previous = None if self._drop_previous() else self.previous
        return previous if previous is not None and key == previous.routes_key else current

    def _drop_previous(self) -> bool:
        """Let the table before the one in force go once its time is up (True if it is gone)."""
        if self.previous is not None and self.clock() >= self._previous_until:
            self.previous = None
            release_free_memory()  # a table at the 2,000-provider fleet is about 10 MB
        return self.previous is None

    def _build(self, path: str | Path) -> tuple[RuntimeTable, dict[str, str], tuple[int, ...]]:
        """The table of the config in `path`, where its keyless providers' keys should come
        from, and the file's signature. The parsed config is not returned: it is let go here,
        in the build's thread, before the memory the build freed is given back (returned, it
        lived until after that, and about 5 MB of its upb arena stayed in glibc's heap after
        every change at the 2,000-provider fleet)."""
        seen = file_signature(Path(path))  # before reading: a file replaced meanwhile is read again
        cfg = read_config(Path(path))
        # Built even when the config is unchanged: config-sync rewrites it after a key rotation
        # (what is unchanged, keys included, is taken from the table in force).
        table = RuntimeTable.from_config(cfg, self.resolve_key, reuse=self.current)
        return table, key_sources(cfg, table), seen

    def load_file(self, path: str | Path) -> bool:
        """Try to install the config in `path`; on any failure keep the current table."""
        try:
            table, sources, seen = self._build(path)
            self._use(table, sources)
        except Exception as exc:
            return self._failed(path, exc)
        self._built_from = seen
        return self._loaded(table)

    async def load_file_async(self, path: str | Path) -> bool:
        """`load_file`, with the file read and the table built in a thread: at the 2,000-provider
        fleet a table takes 0.25 s, during which the event loop would serve no request. It is
        put in force on the loop (what is notified of it runs there)."""
        try:
            table, sources, seen = await asyncio.to_thread(self._build, path)
            self._use(table, sources)
        except Exception as exc:
            return self._failed(path, exc)
        finally:
            # What the build freed stays in its thread's malloc arena otherwise (about 10 MB
            # of a worker at the 2,000-provider fleet): a worker's RSS is what a pod's limit counts.
            release_free_memory()
        self._built_from = seen
        return self._loaded(table)

    def _failed(self, path: str | Path, exc: Exception) -> bool:
        # Expected ones (unreadable, unparsable, unknown version) and anything else: a reload
        # must never take the table in force, or the task that watches, down with it.
        self.last_error = f"{type(exc).__name__}: {exc}"
        self.reload_failures += 1
        if self.metrics is not None:
            self.metrics.config_reload_failures.inc()
        log.error("keeping routing config generation %s: cannot load %s: %s", self.current.generation, path, exc)
        return False

    def _loaded(self, table: RuntimeTable) -> bool:
        self.last_error = ""
        log.info(
            "routing config generation %s loaded (%d policies, %d backends, hash %s)",
            table.generation,
            len(table.policies),
            len(table.backends),
            table.content_hash[:12],
        )
        return True

    async def watch(self, path: str | Path, stop: asyncio.Event) -> None:
        """Reload whenever anything in the file's directory changes (ConfigMap symlink swaps)."""
        from watchfiles import awatch

        path = Path(path)
        # The writer (config-sync, `signalbox up`) may start later than the ext_proc.
        path.parent.mkdir(parents=True, exist_ok=True)
        # The file loaded at start (main.serve_until_stopped) is not built again: a second
        # table beside the first, built in another thread, left each worker 10 MB larger at the
        # 2,000-provider fleet (glibc keeps a thread's freed memory in that thread's arena).
        await self._load_if_changed(path)
        async for _ in awatch(path.parent, stop_event=stop, debounce=50, step=20):
            await self._load_if_changed(path)

    async def _load_if_changed(self, path: Path) -> None:
        """Load the file unless it is not there yet or is the version in force. A file not yet
        written is not a failed load: every `signalbox up` starts its workers before the config
        exists, and each logged an error and counted a reload failure. Other files in the folder
        (a writer's temporary file) must not rebuild the table in force: at the 2,000-provider
        fleet a build is 0.25 s of a core and 10 MB in a thread's arena."""
        seen = file_signature(path)
        if not seen or seen in (self._built_from, self._failed_on):
            return  # a bad file is reported once, not again on each event in its folder
        if not await self.load_file_async(path):
            self._failed_on = seen


def routes_differ(old: RuntimeTable, new: RuntimeTable) -> bool:
    """Whether a request that arrived under `old`'s routes may have no route when decided by
    `new`: a policy of `old` is gone, or `new` may send one to a target that `old` did not
    (a compiled policy's one route takes any target). A change that only adds policies or
    leaves targets needs no table kept for the old routes (`TableHolder.for_routes`)."""

    def targets(policy: PolicyRuntime) -> frozenset[str]:
        return frozenset(c.target for c in (*policy.choices, *(c for r in policy.routes for c in r.choices)))

    for policy_id, before in old.by_id.items():
        after = new.by_id.get(policy_id)
        if after is None:
            return True
        if not before.compiled and not targets(after) <= targets(before):
            return True
    return False


def replace_text(path: Path, text: str) -> None:
    """Write `text` to `path` by rename, so a reader polling for the file never sees it empty or
    half written (the name of the file written first is this process's own)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def file_signature(path: Path) -> tuple[int, ...]:
    """What tells one version of the file from another (a ConfigMap's `..data` swap changes
    the inode behind the path; a rewrite in place, the time or size); () when it is missing."""
    try:
        st = path.stat()
    except OSError:
        return ()
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def read_config(path: Path) -> pb.RoutingConfig:
    """The compiled config from a file: binary protobuf as the publishers write it
    (gatewayfiles.CONFIG_FILE), or JSON when the name ends in .json (written by hand)."""
    if path.suffix == ".json":
        return json_format.Parse(path.read_text(), pb.RoutingConfig())
    return pb.RoutingConfig.FromString(path.read_bytes())


def key_sources(cfg: pb.RoutingConfig, table: RuntimeTable) -> dict[str, str]:
    """Where the key of each provider of `table` whose key cannot be read should come from."""
    return {p.id: key_source(cfg, p.id) for p in table.providers_without_key}


def key_source(cfg: pb.RoutingConfig, provider_id: str) -> str:
    """Where a provider's key should come from, named, never its value."""
    for p in cfg.providers:
        if p.id == provider_id:
            source = p.auth.WhichOneof("source")
            if source == "secret":
                return f"Secret {p.auth.secret.namespace}/{p.auth.secret.name} key {p.auth.secret.key}"
            if source == "env":
                return f"environment variable {p.auth.env}"
            if source == "file":
                return f"file {p.auth.file}"
    return "unknown source"
