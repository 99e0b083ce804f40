"""Envoy's cluster and route files in protobuf's binary form, each part converted once.

Why: Envoy re-reads a whole resource file on any change, and at the 2,000-provider fleet its
10 MB of clusters as JSON took it about 1.0 s of its main thread (JSON to protobuf, then every
cluster hashed and compared), a policy with a new failover chain 2.6 s until its alias
answered. The same clusters as a binary DiscoveryResponse (4.5 MB; Envoy reads a `.pb` path
as binary) took 0.34-0.55 s (bench/README.md, issue 12).

Converting JSON to protobuf in Python is slow (json_format: ~70 us a cluster), so each
converted cluster and route is kept, keyed by a digest of its JSON, for as long as it is in the
file: a change converts only what it added or changed. Envoy's message types come from
xds-protos, and those Envoy has but xds-protos lacks from our own generated modules
(`signalbox.api.envoyext`); the module of a type is imported the first time a resource names
it.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import orjson
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from signalbox.core.envoygen.listener import REFRESH_CLUSTER_ON_RETRY

if TYPE_CHECKING:
    from signalbox.core.envoygen import ClusterSpec, RouteParts

_TYPE_URL = re.compile(rb"type\.googleapis\.com/([A-Za-z0-9_.]+)")
_PROTOS_ROOT = Path(discovery_pb2.__file__).parents[4]  # the folder that holds envoy/, xds/, udpa/
_imported: set[bytes] = set()  # type names whose modules are imported
# Envoy's packages that xds-protos has no module for, and ours that define them.
_OWN_PROTOS = {
    "envoy.extensions.router.cluster_specifiers.priority_group.v3": "signalbox.api.envoyext.priority_group_pb2",
}


def _import_types(data: bytes) -> None:
    """Import the xds-protos modules that define the types `data` names (JSON or binary: type
    URLs are plain text in both). A proto package is a folder of modules: all are imported."""
    for name in set(_TYPE_URL.findall(data)) - _imported:
        _imported.add(name)
        package = name.decode().rsplit(".", 1)[0]
        if package in _OWN_PROTOS:
            importlib.import_module(_OWN_PROTOS[package])
            continue
        folder = _PROTOS_ROOT.joinpath(*package.split("."))
        for module in sorted(folder.glob("*_pb2.py")):
            importlib.import_module(f"{package}.{module.stem}")


_ROUTE_CONFIGURATION = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

# Fields of Envoy 1.40 that xds-protos 1.85.0's messages lack, as the generator writes them in
# a resource's JSON (a key of a dict) -> their encoding as that dict's message holds it
# (field number and value): RetryPolicy's refresh_cluster_on_retry (14, a bool) for the routes
# that walk a chain by priority groups (`envoygen.listener`). Envoy's own JSON reader knows
# them; protobuf keeps them as unknown fields, which it writes out again.
_NEWER_FIELDS = {REFRESH_CLUSTER_ON_RETRY: bytes([14 << 3 | 0, 1])}


def parse_dict(document: dict[str, Any], message: Message) -> Message:
    """`document` (a resource's JSON, which it leaves as it was) read into `message` as
    json_format.ParseDict reads it, and the fields xds-protos lacks (`_NEWER_FIELDS`: booleans,
    written when true) into the messages that hold them, inside an Any too."""
    found: list[tuple[tuple[str | int, ...], bytes]] = []

    def without(node: Any, path: tuple[str | int, ...]) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key not in _NEWER_FIELDS:
                    out[key] = without(value, (*path, key))
                elif value is True:
                    found.append((path, _NEWER_FIELDS[key]))
            return out
        if isinstance(node, list):
            return [without(value, (*path, i)) for i, value in enumerate(node)]
        return node

    json_format.ParseDict(without(document, ()), message)
    for path, encoded in found:
        _merge_at(message, path, encoded)
    return message


def _merge_at(message: Message, path: tuple[str | int, ...], encoded: bytes) -> None:
    """Merge `encoded` into the message at `path` (JSON keys and list indices) of `message`; an
    Any on the way is unpacked (its JSON holds its message's fields) and packed again."""
    if isinstance(message, any_pb2.Any):
        inner = _message_of(message)
        _merge_at(inner, path, encoded)
        message.Pack(inner, deterministic=True)
        return
    if not path:
        message.MergeFromString(encoded)
        return
    step, rest = path[0], path[1:]
    field = getattr(message, str(step))
    if rest and isinstance(rest[0], int):
        _merge_at(field[rest[0]], rest[1:], encoded)
    else:
        _merge_at(field, rest, encoded)


def _key(raw: bytes, message_type: type[Message]) -> bytes:
    """What a converted part is kept under: its message type and a digest of its JSON."""
    return message_type.DESCRIPTOR.full_name.encode() + hashlib.blake2b(raw, digest_size=16).digest()


_AGGREGATE = "envoy.clusters.aggregate"


def _members(resource: dict[str, Any]) -> list[str] | None:
    """An aggregate cluster's member clusters (None for any other resource)."""
    cluster_type = resource.get("cluster_type")
    if isinstance(cluster_type, dict) and cluster_type.get("name") == _AGGREGATE:
        members = cluster_type.get("typed_config", {}).get("clusters")
        if isinstance(members, list) and all(isinstance(m, str) for m in members):
            return members
    return None


def _shape(resource: dict[str, Any], members: list[str] | None) -> dict[str, Any]:
    """What resources of one shape share: the resource without its name and, for an aggregate
    cluster, without its members (the 7,712 chains of the 2,000-provider fleet differ in those
    alone)."""
    shape = {**resource, "name": ""}
    if members is not None:
        cluster_type = resource["cluster_type"]
        shape["cluster_type"] = {**cluster_type, "typed_config": {**cluster_type["typed_config"], "clusters": []}}
    return shape


def _message_of(packed: any_pb2.Any) -> Message:
    message_type = message_factory.GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(packed.TypeName()))
    return message_type.FromString(packed.value)


def _renamed(packed: Message, name: str, members: list[str] | None = None) -> any_pb2.Any:
    """A packed resource with another `name` (every named xDS resource's field of that name)
    and, for an aggregate cluster, these `members`."""
    assert isinstance(packed, any_pb2.Any)
    message = _message_of(packed)
    message.name = name  # type: ignore[attr-defined]
    if members is not None:
        typed = message.cluster_type.typed_config  # type: ignore[attr-defined]
        config = _message_of(typed)
        config.clusters[:] = members  # type: ignore[attr-defined]
        typed.Pack(config, deterministic=True)
    out = any_pb2.Any()
    out.Pack(message, deterministic=True)
    return out


class ResourceEncoder:
    """Encodes a resource document (`{"resources": [...]}`) as a binary DiscoveryResponse,
    keeping what the last encode converted (a publisher holds one per document). A cluster is
    converted whole; a route table, which is one resource, route by route: a policy change
    converts its own routes, not the fleet's 6,600."""

    def __init__(self) -> None:
        self._kept: dict[bytes, Message] = {}
        self._used: dict[bytes, Message] = {}
        self._last: tuple[bytes, bytes] = (b"", b"")  # the last document's digest, its encoding
        # A converted part of each skeleton (its JSON with the string values emptied), to make
        # the other parts of that skeleton from (`converted`).
        self._templates: dict[bytes, _Template] = {}

    def encode(self, document: dict[str, Any]) -> bytes:
        # Most changes leave the clusters as they are (a policy over existing chains): one
        # digest of the whole document, not one per cluster.
        digest = hashlib.blake2b(orjson.dumps(document), digest_size=16).digest()
        if digest == self._last[0]:
            return self._last[1]
        self.start()
        response = discovery_pb2.DiscoveryResponse()
        for resource in document["resources"]:
            if resource.get("@type") == _ROUTE_CONFIGURATION:
                response.resources.add().Pack(self._route_configuration(resource), deterministic=True)
            else:
                response.resources.append(self.packed(resource))
        self.finish()
        encoded = response.SerializeToString(deterministic=True)
        self._last = (digest, encoded)
        return encoded

    def start(self) -> None:
        """A new document: what it converts or reuses is kept after `finish`, the rest let go."""
        self._used = {}

    def finish(self) -> None:
        self._kept, self._used = self._used, {}

    def packed(self, resource: dict[str, Any]) -> any_pb2.Any:
        """A resource (a cluster) as an Any, converted once while in use (between `start` and
        `finish`). A named one not converted before is made from its
        shape (`_shape`) when a resource of that shape was converted: a provider's backends
        differ in their names alone, the failover chains in their names and members (at the
        2,000-provider fleet's start the backend clusters took 0.8 s to convert, before Envoy
        could start, and the 7,712 chains 0.7 s of the rest of its generation)."""
        raw = orjson.dumps(resource)
        key = _key(raw, any_pb2.Any)
        known = self._used.get(key) or self._kept.get(key)
        name = resource.get("name")
        if known is None and isinstance(name, str) and name:
            members = _members(resource)
            shape_key = _key(orjson.dumps(_shape(resource, members)), any_pb2.Any)
            # Any resource of the shape stands for it: renamed (and given its members) when
            # another one has it.
            shape = self._used.get(shape_key) or self._kept.get(shape_key)
            known = self._convert(raw, any_pb2.Any) if shape is None else _renamed(shape, name, members)
            self._used[shape_key] = shape or known
        elif known is None:
            known = self._convert(raw, any_pb2.Any)
        self._used[key] = known
        return cast(any_pb2.Any, known)

    @staticmethod
    def _convert(raw: bytes, message_type: type[Message]) -> Message:
        _import_types(raw)
        # From a copy: json_format moves each "@type" to the end of its dict, and the caller's
        # document would no longer match its own digest.
        return parse_dict(orjson.loads(raw), message_type())

    def converted(self, part: dict[str, Any], message_type: type[Message]) -> Message:
        """`part` as a `message_type`, converted once while it stays in use (callers copy it).
        A part not converted before is made from one of the same skeleton (the same JSON but for
        its string values) when one was: its message copied, and only the strings where the
        two differ set (`_Template.made`). The 2,000-provider fleet's 6,608 routes have 16
        skeletons; converting each with json_format took 1.0 s of the start (0.38 s now), while
        Envoy waited for its routes."""
        raw = orjson.dumps(part)
        key = _key(raw, message_type)
        converted = self._used.get(key) or self._kept.get(key)
        if converted is None:
            tokens = _STRING.findall(raw)
            strings = [string for string, colon in tokens if not colon]
            # The skeleton: the JSON with every string emptied, and its keys in order.
            keys = b"\0".join(string for string, colon in tokens if colon)
            template_key = _key(_ANY_STRING.sub(b'""', raw) + b"\0" + keys, message_type)
            template = self._templates.get(template_key)
            if template is None:
                converted = self._convert(raw, message_type)
                if len(self._templates) >= _MAX_TEMPLATES:
                    self._templates.clear()
                self._templates[template_key] = _Template(converted, part, strings)
            else:
                _import_types(raw)
                converted = template.made(part, strings)
        self._used[key] = converted
        return converted

    def _route_configuration(self, resource: dict[str, Any]) -> Message:
        from envoy.config.route.v3 import route_components_pb2, route_pb2

        table = route_pb2.RouteConfiguration()
        table.CopyFrom(
            self.converted(
                {k: v for k, v in resource.items() if k not in ("@type", "virtual_hosts")},
                route_pb2.RouteConfiguration,
            )
        )
        for host in resource.get("virtual_hosts", []):
            added = table.virtual_hosts.add()
            added.CopyFrom(
                self.converted({k: v for k, v in host.items() if k != "routes"}, route_components_pb2.VirtualHost)
            )
            added.routes.extend(self.converted(route, route_components_pb2.Route) for route in host.get("routes", []))
        return table


# Skeletons a converter keeps a template of (a publisher's documents have a few dozen).
_MAX_TEMPLATES = 1024
# A string in orjson's compact JSON, and the colon after it if it is a key. Matched from the
# start, each match takes a whole string.
_STRING = re.compile(rb'("[^"\\]*(?:\\.[^"\\]*)*")(:?)')
_ANY_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def _string_paths(part: Any) -> list[tuple[str | int, ...]]:
    """The path of each string value of `part`, in the order its JSON holds them."""
    out: list[tuple[str | int, ...]] = []

    def walk(node: Any, path: tuple[str | int, ...]) -> None:
        if isinstance(node, str):
            out.append(path)
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*path, i))

    walk(part, ())
    return out


# How to reach a string of a part in its message: the fields (and indices) to go through, then
# the string field (and index) to set, or None when the message reached is converted again.
_Step = tuple[str, int | str | None]
_Plan = tuple[list[_Step], _Step | None, int]


def _plan(descriptor: Any, path: tuple[str | int, ...]) -> _Plan:
    """Where the string at `path` is set: through message fields to a string field, else the
    smallest message around it that json_format does not read field by field is converted
    again: `depth` is how much of the path reaches that message."""
    steps: list[_Step] = []
    depth = 0
    while depth < len(path):
        step = path[depth]
        if not isinstance(step, str):
            break
        field = descriptor.fields_by_name.get(step)
        # Only a string is set; a message is gone through. A map's JSON key, and what is inside
        # an Any or a Struct, name no field (and a map's key is no index): their message is
        # converted again, as is the one around any other scalar (json_format reads an enum,
        # bytes or a 64-bit integer from its string form).
        if field is None or field.type not in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE):
            break
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            # A map of messages by name (a route's typed_per_filter_config): its value is gone
            # through by its key, so a string changed inside one filter's config converts that
            # config again, not the whole route around it (a route's models script, whose
            # aliases change with the config).
            key, value = path[depth + 1] if depth + 1 < len(path) else None, entry.fields_by_name["value"]
            named = entry.fields_by_name["key"].type == FieldDescriptor.TYPE_STRING
            if not isinstance(key, str) or not named or value.type != FieldDescriptor.TYPE_MESSAGE:
                break
            steps.append((step, key))
            descriptor = value.message_type
            depth += 2
            continue
        index = path[depth + 1] if field.is_repeated and depth + 1 < len(path) else None
        if field.is_repeated and not isinstance(index, int):
            break  # a map's key, or no index at all
        index = cast(int | None, index)
        width = 2 if field.is_repeated else 1
        if field.type == FieldDescriptor.TYPE_STRING:
            if depth + width == len(path):
                return steps, (step, index), depth
            break
        steps.append((step, index))
        descriptor = field.message_type
        depth += width
    return steps, None, depth


class _Template:
    """A converted part, its string values (as JSON) and where each is set: another part of its
    skeleton (the same JSON but for its string values) is this message with that part's
    strings set where they differ."""

    def __init__(self, message: Message, part: dict[str, Any], strings: list[bytes]) -> None:
        self.message = message
        self.strings = strings
        self.paths = _string_paths(part)
        assert len(self.paths) == len(strings)
        self.plans = [_plan(message.DESCRIPTOR, path) for path in self.paths]

    def made(self, part: dict[str, Any], strings: list[bytes]) -> Message:
        """`part` as json_format would convert it: the differing strings set where they are
        plain strings, the smallest message around each other one converted again from `part`."""
        out = type(self.message)()
        out.CopyFrom(self.message)
        redone: list[tuple[str | int, ...]] = []
        for path, (steps, last, depth), value, was in zip(self.paths, self.plans, strings, self.strings, strict=True):
            if value == was or any(path[: len(done)] == done for done in redone):
                continue
            message = out
            for name, index in steps:
                message = getattr(message, name) if index is None else getattr(message, name)[index]
            if last is None:
                redone.append(path[:depth])
                node: Any = part
                for step in path[:depth]:
                    node = node[step]
                message.Clear()
                parse_dict(node, message)
            elif last[1] is None:
                setattr(message, last[0], orjson.loads(value))
            else:
                getattr(message, last[0])[last[1]] = orjson.loads(value)
        return out


def _digest_of(parts: Iterable[bytes]) -> bytes:
    """One digest of a sequence of byte strings (each length-prefixed: never two sequences
    for one digest by where their parts meet)."""
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(len(part).to_bytes(4, "big"))
        digest.update(part)
    return digest.digest()


class KeyedEncoder:
    """Encodes a document given as keyed resources (`envoygen.ClusterSpec`: a key that differs
    whenever the resource would, and how to make it), the same bytes `ResourceEncoder` gives for
    the made document. A resource is made and converted once per key while it stays in use:
    a change makes only what it added or altered, and the same keys again give the last
    encoding back."""

    def __init__(self, converter: ResourceEncoder | None = None) -> None:
        # What is new is converted by `converter` (by shape: a provider's backends, and what
        # it converted for its own last document).
        self._converter = converter or ResourceEncoder()
        self._kept: dict[bytes, any_pb2.Any] = {}
        self._last: tuple[bytes, bytes] = (b"", b"")

    def encode(self, specs: list[ClusterSpec]) -> bytes:
        digest = _digest_of(key for key, _ in specs)
        if digest == self._last[0]:
            return self._last[1]
        used: dict[bytes, any_pb2.Any] = {}
        self._converter.start()
        response = discovery_pb2.DiscoveryResponse()
        for key, make in specs:
            packed = used.get(key) or self._kept.get(key)
            if packed is None:
                packed = self._converter.packed(make())
            used[key] = packed
            response.resources.append(packed)
        self._converter.finish()
        self._kept = used
        encoded = response.SerializeToString(deterministic=True)
        self._last = (digest, encoded)
        return encoded


class RouteTableEncoder:
    """Encodes the route table given as `envoygen.RouteParts` (its routes in keyed groups), the
    same bytes `ResourceEncoder` gives for `parts.config()`: a group's routes are made and
    converted once per key while in use, so a change converts the routes of the policies it
    changed, and the same parts again give the last encoding back."""

    def __init__(self, converter: ResourceEncoder | None = None) -> None:
        self._converter = converter or ResourceEncoder()
        self._kept: dict[bytes, list[Message]] = {}
        self._last: tuple[bytes, bytes] = (b"", b"")

    def encode(self, parts: RouteParts) -> bytes:
        from envoy.config.route.v3 import route_components_pb2, route_pb2

        digest = _digest_of((orjson.dumps(parts.table), orjson.dumps(parts.host), *(key for key, _ in parts.groups)))
        if digest == self._last[0]:
            return self._last[1]
        used: dict[bytes, list[Message]] = {}
        converter = self._converter
        converter.start()
        table = route_pb2.RouteConfiguration()
        table.CopyFrom(converter.converted(parts.table, route_pb2.RouteConfiguration))
        host = table.virtual_hosts.add()
        host.CopyFrom(converter.converted(parts.host, route_components_pb2.VirtualHost))
        for key, make in parts.groups:
            routes = used.get(key) or self._kept.get(key)
            if routes is None:
                routes = [converter.converted(route, route_components_pb2.Route) for route in make()]
            used[key] = routes
            host.routes.extend(routes)
        converter.finish()
        self._kept = used
        response = discovery_pb2.DiscoveryResponse()
        response.resources.add().Pack(table, deterministic=True)
        encoded = response.SerializeToString(deterministic=True)
        self._last = (digest, encoded)
        return encoded


def decode(data: bytes) -> dict[str, Any]:
    """A binary resource file as the JSON document it was made from (for tests and people)."""
    _import_types(data)
    return json_format.MessageToDict(discovery_pb2.DiscoveryResponse.FromString(data), preserving_proto_field_name=True)
