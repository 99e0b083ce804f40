"""Budget admission and decision tokens: the two places a concurrent or crafted request could
get past a limit."""

from __future__ import annotations

import collections
import multiprocessing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signalbox.core.budget import Budget
from signalbox.core.errors import MalformedRequest
from signalbox.extproc import decide
from signalbox.extproc.decisions import DecisionSigner
from signalbox.extproc.ledger import SpendLedger
from signalbox.extproc.strategies import SelectionState

NOW = 1_800_000_000.0


LIMITS = Budget(hourly_usd=0.05, daily_usd=0, downgrade_at=1.0, reject_when_exhausted=True)
ROUNDS = 40


def _admit_worker(path: str, go, n: int, out) -> None:
    ledger = SpendLedger(path)
    admitted = []
    for r in range(ROUNDS):  # every process races on each policy in turn, starting together
        go.wait()
        for i in range(3):
            if ledger.admit(f"default/p{r}", LIMITS, f"{n}-{r}-{i}", 0.04, NOW + 60, NOW) is None:
                admitted.append(r)
    out.put(admitted)
    ledger.close()


def test_concurrent_admission_across_workers_never_overshoots_by_more_than_one_estimate(tmp_path):
    """Four worker processes on one ledger file admit $0.04 requests against $0.05, 40 times
    over: reading spend and inserting the hold in separate steps let several in on the same room."""
    path = str(tmp_path / "spend.db")
    SpendLedger(path).close()
    ctx = multiprocessing.get_context("spawn")
    go, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_admit_worker, args=(path, go, n, out)) for n in range(4)]
    for proc in procs:
        proc.start()
    admitted = collections.Counter(r for _ in procs for r in out.get(timeout=60))
    for proc in procs:
        proc.join(timeout=30)
    # $0 -> admit, $0.04 -> admit, $0.08 -> refuse: at most the limit plus one estimate.
    assert admitted == {r: 2 for r in range(ROUNDS)}


def test_an_admitted_hold_is_replaced_by_the_real_cost():
    ledger = SpendLedger()
    limits = Budget(hourly_usd=1.0, daily_usd=0, downgrade_at=1.0, reject_when_exhausted=True)
    assert ledger.admit("p", limits, "h1", 0.6, NOW + 60, NOW) is None
    assert ledger.admit("p", limits, "h2", 0.6, NOW + 60, NOW) is None  # 0.6 < 1.0: admitted
    refused = ledger.admit("p", limits, "h3", 0.6, NOW + 60, NOW)
    assert refused is not None and refused.state == "exhausted"
    ledger.add("p", 0.01, NOW, release="h1")
    ledger.add("p", 0.01, NOW, release="h2")
    assert ledger.admit("p", limits, "h4", 0.6, NOW + 60, NOW) is None


def test_decision_tokens_are_signed_and_forgeries_refused():
    signer = DecisionSigner(b"k" * 32)
    token = signer.token("p", "code/simple", "default/a/m")
    assert signer.read(token) == ("p", "code/simple", "default/a/m")
    payload, _, mac = token.partition(".")
    forged = DecisionSigner(b"other").token("p", "code/simple", "default/b/m")
    for bad in (forged, payload, f"{payload}.{mac[:-2]}AA", forged.split(".")[0] + "." + mac, "", "...", 42):
        with pytest.raises(ValueError):
            signer.read(bad)
    assert "k" * 32 not in repr(signer)


def test_the_key_file_is_shared_by_workers_that_start_together(tmp_path):
    a = DecisionSigner.from_file(tmp_path / "state" / "decision.key", create=True)
    b = DecisionSigner.from_file(tmp_path / "state" / "decision.key", create=True)
    assert b.read(a.token("p", "c", "b")) == ("p", "c", "b")
    assert (tmp_path / "state" / "decision.key").stat().st_mode & 0o077 == 0


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_feedback_bodies_are_refused_with_400_or_404_only(body):
    from signalbox.extproc.runtime import RuntimeTable

    try:
        decide.apply_feedback(RuntimeTable.empty(), SelectionState(), body, DecisionSigner())
    except MalformedRequest:
        pass
    except Exception as exc:
        assert getattr(exc, "status", 500) < 500, exc


def _read_or_create(path: str) -> str:
    from signalbox.extproc.decisions import DecisionSigner

    try:
        return DecisionSigner.from_file(path, create=True).token("p", "c", "b")
    except ValueError as exc:
        return f"error: {exc}"


def test_workers_starting_together_all_read_one_whole_decision_key(tmp_path):
    """Every ext_proc worker creates the key if it is missing; one once read the file another
    had created but not yet written, and died at start."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(8) as pool:
        for round_ in range(40):
            path = str(tmp_path / str(round_) / "decision.key")
            tokens = pool.map(_read_or_create, [path] * 8)
            assert len(set(tokens)) == 1 and not tokens[0].startswith("error"), tokens
