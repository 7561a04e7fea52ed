"""Ctrl-C is deferred, not lost, when it lands inside llama.cpp's log callback (a ctypes callback drops
exceptions); anywhere else it is a KeyboardInterrupt at once."""

import sys

import pytest

from safeinfer_local.llama import interrupts


def test_interrupt_inside_the_log_callback_is_deferred_to_the_next_decode():
    def llama_log_callback():  # the name of llama-cpp-python's callback
        interrupts._on_sigint(2, sys._getframe())

    llama_log_callback()  # no exception here: it would be dropped by ctypes
    with pytest.raises(KeyboardInterrupt):
        interrupts.raise_deferred_interrupt()
    interrupts.raise_deferred_interrupt()  # raised once only


def test_interrupt_elsewhere_raises_at_once():
    with pytest.raises(KeyboardInterrupt):
        interrupts._on_sigint(2, sys._getframe())
    interrupts.raise_deferred_interrupt()  # nothing deferred
