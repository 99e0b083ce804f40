"""The collector pause around whole-config builds (issue 12) must always give the collector
back as it found it: a build that left it off would let every later cycle leak."""

import gc

import pytest

from signalbox.core.compiler import compile_config
from signalbox.core.gcpause import paused_gc


@pytest.fixture(autouse=True)
def collector_on():
    gc.enable()
    yield
    gc.enable()


def test_paused_inside_and_restored_after_nesting_and_errors():
    with paused_gc():
        assert not gc.isenabled()
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner block leaves it to the outer one
    assert gc.isenabled()
    with pytest.raises(ValueError), paused_gc():
        raise ValueError("a build that fails")
    assert gc.isenabled()


def test_never_enables_a_collector_that_was_off():
    gc.disable()
    with paused_gc():
        pass
    assert not gc.isenabled()


def test_a_compile_gives_the_collector_back():
    assert compile_config([], []).config is not None
    assert gc.isenabled()
