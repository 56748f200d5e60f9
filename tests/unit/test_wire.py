"""Frame bytes built once per message are the bytes websockets itself would write."""

from __future__ import annotations

import pytest
from websockets.protocol import State
from websockets.server import ServerProtocol

from service.wire import WireFrames, text_frame


def written_by_websockets(text: str) -> bytes:
    """What an open server-side websockets protocol writes for `send_text(text)`."""
    protocol = ServerProtocol()
    protocol.state = State.OPEN
    protocol.send_text(text.encode())
    return b"".join(protocol.data_to_send())


# Every length encoding (7-bit, 16-bit, 64-bit) on both sides of its limits, and UTF-8.
@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_is_what_websockets_writes(length: int) -> None:
    text = "x" * length
    assert text_frame(text) == written_by_websockets(text)


def test_text_frame_encodes_utf8() -> None:
    text = '{"data":"héllo wörld ✓ 🎉"}'
    assert text_frame(text) == written_by_websockets(text)


def test_wire_frames_builds_once_per_string_object() -> None:
    frames = WireFrames()
    text = "".join(["{", '"a":1', "}"])  # not interned: a fresh object
    first = frames(text)
    assert frames(text) is first  # the same str again: reused
    equal = "".join(["{", '"a":1', "}"])
    assert equal is not text
    assert frames(equal) == first  # an equal but distinct str is rebuilt, same bytes
    assert frames("other") == text_frame("other")
