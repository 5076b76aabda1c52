"""The allocator tuning the command line applies: glibc only, and a user can opt out."""

import ctypes.util

import pytest

from anomatune.allocator import OPT_OUT, tune_allocator


def test_opting_out_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv(OPT_OUT, "system")
    assert tune_allocator() is False


@pytest.mark.skipif(ctypes.util.find_library("c") is None, reason="no C library found by ctypes")
def test_tuning_applies_on_glibc(monkeypatch):
    monkeypatch.delenv(OPT_OUT, raising=False)
    glibc = hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallopt")
    assert tune_allocator() is glibc
