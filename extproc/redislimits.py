"""The limit store of several gateway replicas: Redis, one Lua script per admission.

The script runs the same rules as `limits.check` (tests hold both stores to one suite) over
every subject of the request, and places the holds only when all of them admit: Redis runs a
script atomically, so no two replicas can admit on the same remaining room.

Keys, per subject `s` (all expire on their own, nothing needs sweeping):
- `sbx:{s}:req:<minute>` / `sbx:{s}:tok:<minute>`: requests admitted / tokens used in a minute;
- `sbx:{s}:usd:<window>:<start>`: USD spent in an hour, day or month;
- `sbx:{s}:holds`: request id -> "tokens usd until" of the requests in flight.

The clock is the gateways' (`now` is an argument), so a test can place requests in a window
and replicas agree as far as NTP does. Every call has a short timeout: a store that does not
answer is `StoreUnavailable`, which the caller turns into the configured failure mode.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from signalbox.core.limits import (
    BUDGET_WINDOWS,
    DAY,
    HOUR,
    Admission,
    Admitted,
    Charge,
    Refusal,
    Windows,
    check,
    usd_key,
)

from .limits import StoreUnavailable

log = logging.getLogger("signalbox.extproc")

# Lua: read every subject's counters and holds (lapsed holds are charged at their estimate),
# return the numbers for each; when `place` is 1 and no subject refuses, count the request and
# place the holds. Refusal itself is decided in Python on the numbers (limits.check), so there
# is one statement of the rules; the script only guarantees that the numbers it admitted on
# are the numbers it changed (the check is repeated inside: see _ADMIT).
_ADMIT = """
local now, minute = tonumber(ARGV[1]), ARGV[2]
local starts = {ARGV[3], ARGV[4], ARGV[5]}
local ttls = {tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])}
local request, tokens, usd, untl = ARGV[9], tonumber(ARGV[10]), tonumber(ARGV[11]), ARGV[12]
local n = tonumber(ARGV[13])
local windows = {'hour', 'day', 'month'}
local out = {}
local refused = 0
for i = 0, n - 1 do
  local base = 14 + i * 9
  local s = ARGV[base]
  local rpm, tpm, conc = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local limits = {tonumber(ARGV[base + 4]), tonumber(ARGV[base + 5]), tonumber(ARGV[base + 6])}
  local reject = ARGV[base + 7] == '1'
  local prefix = 'sbx:{' .. s .. '}:'
  local holds = redis.call('HGETALL', prefix .. 'holds')
  local held_tokens, held_usd, held_count = 0, 0, 0
  local lapsed = 0
  for j = 1, #holds, 2 do
    local t, u, until_ = string.match(holds[j + 1], '(%S+) (%S+) (%S+)')
    if tonumber(until_) <= now then
      redis.call('HDEL', prefix .. 'holds', holds[j])
      lapsed = lapsed + tonumber(u)
    else
      held_tokens = held_tokens + tonumber(t)
      held_usd = held_usd + tonumber(u)
      held_count = held_count + 1
    end
  end
  local spent = {}
  for w = 1, 3 do
    local key = prefix .. 'usd:' .. windows[w] .. ':' .. starts[w]
    if lapsed > 0 then
      redis.call('INCRBYFLOAT', key, lapsed)
      redis.call('EXPIRE', key, ttls[w])
    end
    spent[w] = tonumber(redis.call('GET', key) or '0')
  end
  local requests = tonumber(redis.call('GET', prefix .. 'req:' .. minute) or '0')
  local used = tonumber(redis.call('GET', prefix .. 'tok:' .. minute) or '0')
  -- the rules of limits.check, to decide whether to place the holds
  if rpm > 0 and requests + 1 > rpm then refused = 1 end
  if tpm > 0 and used + held_tokens >= tpm then refused = 1 end
  if conc > 0 and held_count >= conc then refused = 1 end
  if reject then
    for w = 1, 3 do
      if limits[w] > 0 and spent[w] + held_usd >= limits[w] then refused = 1 end
    end
  end
  table.insert(out, tostring(requests))
  table.insert(out, tostring(used))
  table.insert(out, tostring(held_tokens))
  table.insert(out, tostring(held_count))
  table.insert(out, tostring(spent[1]))
  table.insert(out, tostring(spent[2]))
  table.insert(out, tostring(spent[3]))
  table.insert(out, tostring(held_usd))
end
if refused == 0 then
  for i = 0, n - 1 do
    local prefix = 'sbx:{' .. ARGV[14 + i * 9] .. '}:'
    redis.call('INCR', prefix .. 'req:' .. minute)
    redis.call('EXPIRE', prefix .. 'req:' .. minute, 120)
    redis.call('HSET', prefix .. 'holds', request, tokens .. ' ' .. usd .. ' ' .. untl)
    redis.call('EXPIRE', prefix .. 'holds', 86400)
  end
end
table.insert(out, tostring(refused))
return out
"""

# Lua: release a request's holds and charge its real usage.
_SETTLE = """
local minute = ARGV[1]
local starts = {ARGV[2], ARGV[3], ARGV[4]}
local ttls = {tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])}
local request, n = ARGV[8], tonumber(ARGV[9])
local windows = {'hour', 'day', 'month'}
for i = 0, n - 1 do
  local base = 10 + i * 3
  local prefix = 'sbx:{' .. ARGV[base] .. '}:'
  local tokens, usd = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  redis.call('HDEL', prefix .. 'holds', request)
  if tokens > 0 then
    redis.call('INCRBYFLOAT', prefix .. 'tok:' .. minute, tokens)
    redis.call('EXPIRE', prefix .. 'tok:' .. minute, 120)
  end
  if usd > 0 then
    for w = 1, 3 do
      local key = prefix .. 'usd:' .. windows[w] .. ':' .. starts[w]
      redis.call('INCRBYFLOAT', key, usd)
      redis.call('EXPIRE', key, ttls[w])
    end
  end
end
return 1
"""

# How long a window's USD counter outlives the window (status reads it a little after).
_TTLS = (HOUR + 600, DAY + 600, 32 * DAY)
# One slow answer must not hold requests for long: past this the store counts as unreachable
# (and each limit does what whenStoreUnavailable says).
DEFAULT_TIMEOUT_SECONDS = 0.5


def _num(x: Any) -> float:
    return float(x.decode() if isinstance(x, bytes) else x)


class RedisLimits:
    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT_SECONDS, password: str | None = None):
        # rediss:// for TLS; a password from the URL or (better: not in a URL) `password`.
        self.client = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, password=password or None
        )
        self._admit = self.client.register_script(_ADMIT)
        self._settle = self.client.register_script(_SETTLE)

    def close(self) -> None:
        # The pool's sockets close with the process; an async close needs a running loop.
        pass

    async def aclose(self) -> None:
        await self.client.aclose()

    async def admit(self, a: Admission) -> Admitted | Refusal:
        w = Windows.at(a.now)
        args: list[Any] = [
            repr(a.now),
            w.minute,
            *w.budget_starts(),
            *_TTLS,
            a.request_id,
            repr(a.tokens),
            repr(a.usd),
            repr(a.until),
            len(a.subjects),
        ]
        for s in a.subjects:
            args += [
                s.subject,
                s.requests_per_minute,
                s.tokens_per_minute,
                s.max_concurrent,
                *(repr(x) for x in s.budget_usd),
                "1" if s.reject_when_exhausted else "0",
                "",
            ]
        try:
            out = await self._admit(args=args)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        budgets: dict[str, tuple[tuple[float, float, float], float]] = {}
        for i, s in enumerate(a.subjects):
            requests, used, held_tokens, held_count, hour, day, month, held_usd = (
                _num(x) for x in out[i * 8 : i * 8 + 8]
            )
            spent = (hour, day, month)
            refusal = check(s, w, a.now, requests, used, held_tokens, int(held_count), spent, held_usd)
            if refusal is not None:
                return refusal
            if s.has_budget:
                budgets[s.subject] = (spent, held_usd)
        return Admitted(budgets)

    async def settle(self, request_id: str, charges: tuple[Charge, ...], now: float) -> None:
        await self.settle_many([(request_id, charges)], now)

    async def settle_many(self, items: list[tuple[str, tuple[Charge, ...]]], now: float) -> None:
        """Every settlement of one access log message in one round trip (a pipeline)."""
        w = Windows.at(now)
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for request_id, charges in items:
                    args: list[Any] = [w.minute, *w.budget_starts(), *_TTLS, request_id, len(charges)]
                    for c in charges:
                        args += [c.subject, repr(c.tokens), repr(c.usd)]
                    await self._settle(args=args, client=pipe)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def spend(self, subject: str, now: float) -> tuple[float, float, float]:
        w = Windows.at(now)
        keys = [usd_key(subject, n, s) for n, s in zip(BUDGET_WINDOWS, w.budget_starts(), strict=True)]
        try:
            values = await self.client.mget(keys)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        hour, day, month = (_num(v) if v is not None else 0.0 for v in values)
        return hour, day, month
