"""Random names made in batches (service/broker/randomness.py)."""

from __future__ import annotations

import os
import string

from service.broker.randomness import BATCH, base32_name, hex_name


def test_names_have_their_shape_and_do_not_repeat_across_batches() -> None:
    epochs = [base32_name() for _ in range(3 * BATCH + 7)]
    tokens = [hex_name() for _ in range(3 * BATCH + 7)]
    assert len(set(epochs)) == len(epochs)
    assert len(set(tokens)) == len(tokens)
    assert all(len(e) == 8 and set(e) <= set("0123456789abcdefghijklmnopqrstuv") for e in epochs)
    assert all(len(t) == 24 and set(t) <= set(string.hexdigits.lower()) for t in tokens)


def test_a_forked_child_does_not_hand_out_its_parents_names() -> None:
    base32_name()  # a batch is under way: the parent's next names are made already
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its first name, and leave without pytest's cleanup
        os.write(write_end, base32_name().encode())
        os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    childs = os.read(read_end, 64).decode()
    os.close(read_end)
    assert status == 0
    assert len(childs) == 8
    assert childs != base32_name()
