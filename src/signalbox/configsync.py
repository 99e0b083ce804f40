"""`signalbox config-sync`: the gateway pod's link to the operator's ConfigMap.

It *watches* the ConfigMap through the Kubernetes API (a mounted ConfigMap reaches a pod only
at the next kubelet sync, up to a minute later) and writes the routing config and the Envoy
resources generated from it into the directory the ext_proc and Envoy watch. A ConfigMap it
cannot parse, or of a schema version this gateway does not know, changes nothing: the last good
files stay.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import time
from pathlib import Path

import kubernetes

from signalbox import envoyadmin, gatewayfiles
from signalbox.api.v1alpha1 import config_pb2 as pb
from signalbox.cmwatch import watch_configmap
from signalbox.core import bundle, envoygen
from signalbox.core.errors import BundleError
from signalbox.core.schema import SCHEMA_VERSION
from signalbox.gatewayfiles import SECRETS_DIR

log = logging.getLogger("signalbox.configsync")
# A rotated key (a Secret changed, the config did not) is picked up within this long.
SECRETS_REFRESH_SECONDS = 60.0
# A part that cannot be read for another reason than 404 (the API server busy) is read again.
PART_READ_ATTEMPTS = 3
# The longest the first config waits for Envoy's backend clusters to warm (an Envoy that never
# answers, or a config without backends, gets its files anyway).
ENVOY_WARM_WAIT_S = 60.0


class ConfigSync:
    def __init__(
        self,
        client: kubernetes.client.ApiClient,
        namespace: str,
        name: str,
        workdir: Path,
        options: envoygen.GatewayOptions,
    ):
        self.core = kubernetes.client.CoreV1Api(client)
        self.namespace, self.name = namespace, name
        self.workdir = workdir
        self.options = options
        self.content_hash = ""
        self.applied: list[tuple[int, float]] = []  # (generation, monotonic time written)
        self.secrets_changed = False
        self.config: pb.RoutingConfig | None = None
        self.secret_reads = 0  # rounds of Secret reads (each reads every Secret the config names)
        # Writing the files an Envoy about to start reads (the init container): backend clusters
        # first (gatewayfiles.write_envoy_backends_first); `run` writes the rest once they warmed.
        self.starting = False

    def apply(self, data: dict[str, str] | None, version: str = "") -> bool:
        """Write the files for this ConfigMap data; False (and nothing written) if unusable."""
        try:
            manifest = bundle.read_manifest(data)
            if manifest.get("contentHash") and manifest["contentHash"] == self.content_hash:
                return True  # the same config again: nothing to read or write
            parts = [self._part(name) for name in manifest.get("parts", [])]
            cfg = bundle.unpack(manifest, (data or {}).get(bundle.INLINE_KEY), parts)
        except BundleError as exc:
            log.error("ignoring ConfigMap %s/%s: %s", self.namespace, self.name, exc)
            return False
        if cfg.schema_version != SCHEMA_VERSION:
            log.error(
                "ignoring routing config schema version %s (this gateway reads %s)", cfg.schema_version, SCHEMA_VERSION
            )
            return False
        if cfg.content_hash == self.content_hash:
            return True
        # Keys first: the ext_proc resolves them when it loads the config written next.
        self.write_secrets(cfg)
        self._publish(cfg)
        return True

    async def _envoy_warm(self, stop: asyncio.Event) -> None:
        admin: int | str = self.options.admin_socket or self.options.admin_port
        deadline = time.monotonic() + ENVOY_WARM_WAIT_S
        while not stop.is_set() and not await asyncio.to_thread(envoyadmin.clusters_warm, admin):
            if time.monotonic() > deadline:
                log.warning("Envoy's clusters not warm after %.0f s: writing its files anyway", ENVOY_WARM_WAIT_S)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)

    def _part(self, name: str) -> str | None:
        """One part of a sharded config; None if it is gone (a newer manifest replaced it: the
        watch delivers that one next)."""
        for attempt in range(PART_READ_ATTEMPTS):
            try:
                obj = self.core.read_namespaced_config_map(name, self.namespace)
                return (obj.data or {}).get(bundle.PART_KEY)
            except kubernetes.client.rest.ApiException as exc:
                if exc.status == 404:
                    return None
                if attempt == PART_READ_ATTEMPTS - 1:
                    raise BundleError(f"cannot read part {name}: HTTP {exc.status}") from exc
                time.sleep(0.5 * (attempt + 1))  # this runs on the watch's thread, not the loop
        return None

    def refresh_secrets(self) -> bool:
        """Re-read the Secrets the config in force names (key rotation changes a Secret, not the
        config); rewrite the files only if a key changed. Returns whether one did."""
        if self.config is None:
            return False
        self.write_secrets(self.config)
        if self.secrets_changed:
            self._publish(self.config)
            return True
        # Vertex AI's access tokens expire hourly: the file gets each one google-auth renews.
        gatewayfiles.refresh_tokens(self.config, self.workdir, self.options)
        return False

    def _publish(self, cfg: pb.RoutingConfig) -> None:
        self.secrets_changed = False
        self.config = cfg
        gatewayfiles.publish(cfg, self.workdir, self.options, backends_first=self.starting)
        self.content_hash = cfg.content_hash
        self.applied.append((cfg.generation, time.monotonic()))
        log.info("wrote routing config generation %s", cfg.generation)

    def write_secrets(self, cfg: pb.RoutingConfig) -> None:
        """Copy the keys the config names into `<workdir>/secrets/<ns>/<name>/<key>` (mode 0600).

        The pod mounts `<workdir>` as a memory-backed emptyDir, as Kubernetes does for Secret
        volumes; values are never logged. A missing Secret is skipped: the operator reports it
        (ResolvedRefs=False) and the ext_proc routes nothing to that provider until its key exists.
        """
        root = self.workdir / SECRETS_DIR
        self.secret_reads += 1
        for provider in cfg.providers:
            if provider.auth.WhichOneof("source") != "secret":
                continue
            ref = provider.auth.secret
            try:
                secret = self.core.read_namespaced_secret(ref.name, ref.namespace)
            except kubernetes.client.rest.ApiException as exc:
                log.warning(
                    "cannot read Secret %s/%s for provider %s: HTTP %s",
                    ref.namespace,
                    ref.name,
                    provider.id,
                    exc.status,
                )
                continue
            value = (secret.data or {}).get(ref.key)
            if value is None:
                continue
            path = root / ref.namespace / ref.name / ref.key
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            data = base64.b64decode(value).decode(errors="replace")
            if not path.exists() or path.read_text() != data:
                tmp = path.with_name(f".{ref.key}.tmp")
                tmp.touch(mode=0o600)
                tmp.write_text(data)
                os.replace(tmp, path)
                self.secrets_changed = True

    def initialize(self) -> None:
        """Before Envoy starts (init container): it refuses to start without the files it watches.

        Writes the ConfigMap's config if it exists and is usable, else an empty config: a
        gateway that answers 404 until the operator publishes, rather than one that cannot start.
        """
        try:
            current = self.core.read_namespaced_config_map(self.name, self.namespace)
            data = current.data
        except kubernetes.client.rest.ApiException as exc:
            if exc.status != 404:
                raise
            data = None
        self.starting = True
        try:
            usable = self.apply(data)
        finally:
            self.starting = False
        if not usable:
            log.warning(
                "no usable ConfigMap %s/%s yet: starting with an empty routing config", self.namespace, self.name
            )
            gatewayfiles.publish(pb.RoutingConfig(schema_version=SCHEMA_VERSION), self.workdir, self.options)

    async def run(self, stop: asyncio.Event) -> None:
        """Apply each new version of the ConfigMap; re-read its Secrets every
        SECRETS_REFRESH_SECONDS for rotated keys. The first version waits for Envoy's backend
        clusters to warm (the init container wrote them alone), at most ENVOY_WARM_WAIT_S."""
        if self.options.endpoints_over_ads:
            await self._envoy_warm(stop)
        watch = asyncio.create_task(watch_configmap(self.core, self.namespace, self.name, self.apply, stop))
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), SECRETS_REFRESH_SECONDS)
                if not stop.is_set():
                    try:
                        await asyncio.to_thread(self.refresh_secrets)
                    except Exception as exc:
                        log.warning("cannot re-read provider Secrets: %s", exc)
                if watch.done():
                    watch.result()  # a watch that ended on its own is a bug: surface it
        finally:
            watch.cancel()
