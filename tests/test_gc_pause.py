"""The loader's garbage-collector pause: off inside, restored after (errors included), one collection."""

from __future__ import annotations

import gc

import pytest

from qconv.runtime import gc_pause


@pytest.fixture(autouse=True)
def _gc_on():
    was = gc.isenabled()
    gc.enable()
    yield
    (gc.enable if was else gc.disable)()


def test_paused_inside_and_restored_with_one_collection(monkeypatch):
    calls = []
    monkeypatch.setattr(gc_pause, "COLLECT_AFTER_IMPORTS", 0)
    monkeypatch.setattr(gc_pause.gc, "collect", lambda *a: calls.append(a) or 0)
    stats: dict = {}
    with gc_pause.gc_paused(stats):
        assert not gc.isenabled()
    assert gc.isenabled()
    assert calls == [()] and stats["gc_collect_s"] >= 0.0


def test_no_collection_when_nothing_was_imported(monkeypatch):
    calls = []
    monkeypatch.setattr(gc_pause.gc, "collect", lambda *a: calls.append(a) or 0)
    stats: dict = {}
    with gc_pause.gc_paused(stats):
        pass
    assert gc.isenabled() and calls == [] and stats == {"gc_collect_s": 0.0}


def test_restored_after_an_error():
    with pytest.raises(RuntimeError, match="boom"):
        with gc_pause.gc_paused():
            raise RuntimeError("boom")
    assert gc.isenabled()


def test_left_off_when_it_was_off(monkeypatch):
    calls = []
    monkeypatch.setattr(gc_pause, "COLLECT_AFTER_IMPORTS", 0)
    monkeypatch.setattr(gc_pause.gc, "collect", lambda *a: calls.append(a) or 0)
    gc.disable()
    with gc_pause.gc_paused():
        assert not gc.isenabled()
    assert not gc.isenabled() and calls == []


def test_switch_leaves_the_collector_alone(monkeypatch):
    monkeypatch.setenv("QCONV_GC_PAUSE", "0")
    stats: dict = {}
    with gc_pause.gc_paused(stats):
        assert gc.isenabled()
    assert gc.isenabled() and stats == {}
