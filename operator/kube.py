"""The operator's few Kubernetes calls, behind one narrow class.

kopf watches and handles the Signalbox resources; everything else the operator does with the
API (read the Secrets it must, write the one ConfigMap, patch other objects' status, post
Events) goes through `ClusterAPI`, built on the official `kubernetes` client. The sync client
runs in a worker thread so the operator's event loop never blocks. Secret values are returned
wrapped in `SecretValue` and are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
import uuid
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

from signalbox.core.bundle import PART_OF_LABEL
from signalbox.core.models import GROUP, VERSION
from signalbox.core.secrets import SecretValue

log = logging.getLogger("signalbox.operator")


class _ApiClient(kubernetes.client.ApiClient):
    """Query booleans spelled as the Kubernetes API documents them (`?watch=true`). The client
    below 37 (pinned so for botocore's python-dateutil) sends Python's `True`: the API server
    takes either, kmock's emulator, where the tests run, only the documented form (its watch
    was answered as a list, and config-sync never saw a change)."""

    def parameters_to_tuples(self, params: Any, collection_formats: Any) -> list[tuple[str, Any]]:
        pairs = super().parameters_to_tuples(params, collection_formats)
        return [(k, ("true" if v else "false") if isinstance(v, bool) else v) for k, v in pairs]


def api_client(server: str | None = None) -> kubernetes.client.ApiClient:
    """In-cluster config, else kubeconfig; `server` (tests: the emulator's URL) overrides both."""
    if server:
        conf = kubernetes.client.Configuration()
        conf.host = server.rstrip("/")
        return _ApiClient(conf)
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    return _ApiClient()


def _configmap(
    namespace: str,
    name: str,
    data: dict[str, str | None],
    annotations: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {"app.kubernetes.io/part-of": "signalbox", **(labels or {})},
    }
    if annotations is not None:
        metadata["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


class ClusterAPI:
    def __init__(self, client: kubernetes.client.ApiClient):
        self.client = client
        self.core = kubernetes.client.CoreV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)

    def close(self) -> None:
        self.client.close()

    async def secret(self, namespace: str, name: str) -> dict[str, SecretValue] | None:
        """The Secret's keys and values, or None if it does not exist."""
        found = await self.secret_with_annotations(namespace, name)
        return None if found is None else found[0]

    async def secret_with_annotations(
        self, namespace: str, name: str
    ) -> tuple[dict[str, SecretValue], dict[str, str]] | None:
        """The Secret's values and annotations, or None if it does not exist."""
        try:
            obj = await asyncio.to_thread(self.core.read_namespaced_secret, name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        data = {k: SecretValue(base64.b64decode(v).decode(errors="replace")) for k, v in (obj.data or {}).items()}
        return data, dict((obj.metadata and obj.metadata.annotations) or {})

    async def write_secret(
        self,
        namespace: str,
        name: str,
        data: dict[str, SecretValue],
        annotations: dict[str, str],
        labels: dict[str, str],
        owner: dict[str, Any] | None = None,
    ) -> None:
        """Create the Secret, or patch its values and annotations when it exists. `owner`: an
        object whose deletion deletes it (ownerReferences)."""
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace, "annotations": annotations, "labels": labels},
            "data": {k: base64.b64encode(v.reveal().encode()).decode() for k, v in data.items()},
        }
        if owner is not None:
            body["metadata"]["ownerReferences"] = [owner]

        def write() -> None:
            try:
                self.core.patch_namespaced_secret(name, namespace, body)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                self.core.create_namespaced_secret(namespace, body)  # type: ignore[arg-type]

        await asyncio.to_thread(write)

    async def configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj = await asyncio.to_thread(self.core.read_namespaced_config_map, name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return {"data": obj.data or {}, "annotations": (obj.metadata and obj.metadata.annotations) or {}}

    async def write_configmap(
        self, namespace: str, name: str, data: dict[str, str | None], annotations: dict[str, str]
    ) -> None:
        """Create or patch; a None value removes that key."""
        body = _configmap(namespace, name, data, annotations=annotations)

        def write() -> None:
            # A patch, not a replace: the same keys are written every time, and a patch leaves
            # other writers' labels and annotations (e.g. Helm's) alone.
            try:
                self.core.patch_namespaced_config_map(name, namespace, body)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                body["data"] = {k: v for k, v in data.items() if v is not None}
                self.core.create_namespaced_config_map(namespace, body)  # type: ignore[arg-type]

        await asyncio.to_thread(write)

    async def write_part(self, namespace: str, name: str, owner: str, data: dict[str, str]) -> None:
        """One part of a sharded routing config: immutable and named by its content, so an
        existing one is already right (409 is success)."""
        body = _configmap(namespace, name, dict(data), labels={PART_OF_LABEL: owner})
        body["immutable"] = True

        def create() -> None:
            try:
                self.core.create_namespaced_config_map(namespace, body)  # type: ignore[arg-type]
            except ApiException as exc:
                if exc.status != 409:
                    raise

        await asyncio.to_thread(create)

    async def delete_parts(self, namespace: str, owner: str, keep: set[str]) -> list[str]:
        """Delete the parts of `owner`'s configs that are not in `keep`; returns their names."""

        def run() -> list[str]:
            listing = self.core.list_namespaced_config_map(namespace, label_selector=f"{PART_OF_LABEL}={owner}")
            gone = []
            for item in listing.items:
                meta = item.metadata
                name = str(meta.name) if meta else ""
                # The label checked again: never delete a ConfigMap that is not one of our parts.
                if not meta or name in keep or (meta.labels or {}).get(PART_OF_LABEL) != owner:
                    continue
                try:
                    self.core.delete_namespaced_config_map(name, namespace)
                except ApiException as exc:
                    if exc.status != 404:
                        raise
                gone.append(name)
            return gone

        return await asyncio.to_thread(run)

    async def patch_status(self, plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        def patch() -> None:
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, plural, name, {"status": status}
            )

        try:
            await asyncio.to_thread(patch)
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile: nothing to report on
                raise

    async def event(self, obj: dict[str, Any], kind: str, reason: str, message: str, warning: bool = False) -> None:
        meta = obj.get("metadata", {})
        namespace = meta.get("namespace") or "default"
        stamp = datetime.datetime.now(tz=datetime.UTC)
        body: Any = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta.get('name')}.{uuid.uuid4().hex[:10]}", "namespace": namespace},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": kind,
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": "signalbox-operator"},
            "firstTimestamp": stamp.isoformat(),
            "lastTimestamp": stamp.isoformat(),
            "count": 1,
        }
        try:
            await asyncio.to_thread(self.core.create_namespaced_event, namespace, body)
        except ApiException as exc:  # Events are best effort: never fail a reconcile over one
            log.warning("could not post event %s for %s/%s: %s", reason, namespace, meta.get("name"), exc.status)
