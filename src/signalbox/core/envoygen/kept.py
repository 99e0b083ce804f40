"""What one generation of Envoy's resources made from the providers and backends alone, kept
for the next while those are the same (issue 12).

Why: the common change is to policies (a route, a strategy, an alias), and it leaves the
providers and backends as they were. Yet each generation walked all of them in a dozen places:
their clusters' keys, the origins they share, attempt.lua and the signers on every attempt,
each chain's members and context windows. At the 2,000-provider fleet (10,000 backends) that
was 0.25-0.3 s of a policy change's 0.35-0.6 s of generation (bench/README.md), on the path from
a change to its alias answering, which issue 12 wants under a second.

How it stays right:
- A value is kept under a digest of every provider and backend (their messages serialized,
  in order) and of whatever else its maker reads, which the caller names (`inputs`). A
  generation where any of them differs makes the value again; one key per name, the last.
- Only inside `generation(cfg)`, which `resource_parts` (every publisher's entry) opens: a
  function called on its own, as the generator's tests call them on configs they edit between
  calls, always makes what it returns. Inside, the config is not edited.
- Kept values hold no protobuf message of the config they were made from (a message keeps its
  whole config alive, and each change would keep one more): strings, dicts, and indexes into
  the config's repeated fields, which stay valid while the digest is the same.
- Callers treat a kept value as read-only (each returns a fresh top-level container where its
  caller may add to it).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from signalbox.api.v1alpha1 import config_pb2 as pb

T = TypeVar("T")

# The config of the generation in progress, and the digest of its providers and backends.
_scope: contextvars.ContextVar[tuple[pb.RoutingConfig, bytes] | None] = contextvars.ContextVar(
    "signalbox_envoygen_generation", default=None
)
# name -> (key, value): the last value made under each name.
_kept: dict[str, tuple[bytes, Any]] = {}


def fleet_digest(cfg: pb.RoutingConfig) -> bytes:
    """A digest of every provider and backend, in order (0.01 s at the 2,000-provider fleet).
    Each message's length goes in before it, so no two lists give the same stream."""
    digest = hashlib.blake2b(digest_size=16)
    for kind, messages in ((b"P", cfg.providers), (b"B", cfg.backends)):
        digest.update(kind + len(messages).to_bytes(4, "little"))
        for message in messages:
            data = message.SerializeToString(deterministic=True)
            digest.update(len(data).to_bytes(4, "little") + data)
    return digest.digest()


@contextlib.contextmanager
def generation(cfg: pb.RoutingConfig) -> Iterator[None]:
    """Within this block, `kept(cfg, ...)` may return what an earlier generation made."""
    token = _scope.set((cfg, fleet_digest(cfg)))
    try:
        yield
    finally:
        _scope.reset(token)


def kept(cfg: pb.RoutingConfig, name: str, make: Callable[[], T], *inputs: str | bytes) -> T:
    """`make()`, or the value it gave last time under `name` if the providers, the backends and
    `inputs` (what else `make` reads) are what they were then."""
    fleet = fleet_key(cfg)
    if fleet is None:
        return make()
    key = hashlib.blake2b(
        fleet + b"".join(len(b).to_bytes(4, "little") + b for b in (_bytes(i) for i in inputs)),
        digest_size=16,
    ).digest()
    hit = _kept.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]  # type: ignore[no-any-return]  # (what `make` gave under this name)
    value = make()
    _kept[name] = (key, value)
    return value


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def last(cfg: pb.RoutingConfig, name: str) -> Any:
    """What `remember` kept under `name` in a generation with the same providers and backends
    (None if none, or outside a generation): for what is kept piece by piece, such as each
    chain's facts (clusters.chains_of), rather than made whole by one maker."""
    fleet = fleet_key(cfg)
    hit = _kept.get(name)
    return hit[1] if fleet is not None and hit is not None and hit[0] == fleet else None


def remember(cfg: pb.RoutingConfig, name: str, value: Any) -> None:
    """Keep `value` under `name` for the next generation's `last` (nothing outside one)."""
    fleet = fleet_key(cfg)
    if fleet is not None:
        _kept[name] = (fleet, value)


def forget() -> None:
    """Drop everything kept: the next generation makes all again."""
    _kept.clear()


def fleet_key(cfg: pb.RoutingConfig) -> bytes | None:
    """The digest of the providers and backends if `cfg` is the config of the generation in
    progress, else None."""
    scope = _scope.get()
    return scope[1] if scope is not None and scope[0] is cfg else None
