"""The bytes of a server's text frame, built once per message (RFC 6455, 5.2).

A server's frames are not masked, so without compression the bytes of a text frame are
the same for every connection: the fan-out hands every member the same `str`, and the
first member's write builds the bytes the others reuse (docs/performance.md, "What
changed, and what each part bought", no. 1).
"""

from __future__ import annotations

import struct

# A final text frame's first byte (FIN and opcode 1), then the payload length in 7 bits,
# or 126 and 16 bits, or 127 and 64 bits.
_HEAD_7 = struct.Struct("!BB")
_HEAD_16 = struct.Struct("!BBH")
_HEAD_64 = struct.Struct("!BBQ")
_FIN_TEXT = 0x81


def text_frame(text: str) -> bytes:
    """The bytes of one unmasked, uncompressed, unfragmented text frame of `text`.

    The bytes websockets' own serializer writes (tests/unit/test_wire.py), without its
    checks and buffer: this runs once per message per worker.
    """
    data = text.encode()
    length = len(data)
    if length < 126:
        return _HEAD_7.pack(_FIN_TEXT, length) + data
    if length < 65536:
        return _HEAD_16.pack(_FIN_TEXT, 126, length) + data
    return _HEAD_64.pack(_FIN_TEXT, 127, length) + data


class WireFrames:
    """Text -> frame bytes, built once for a run of calls with the same `str` object.

    Identity, not equality: comparing would cost as much as a small frame's encoding.
    A writer in a hot loop may read `text` and `wire` itself and call `build` only when
    `text` is not its string, which spares a call per member.
    """

    __slots__ = ("text", "wire")

    def __init__(self) -> None:
        #: The string whose frame `wire` is; held, so no other string can take its identity.
        self.text: str | None = None
        #: The frame bytes of `text`.
        self.wire = b""

    def build(self, text: str) -> bytes:
        """Build and remember the frame bytes of `text`."""
        self.wire = text_frame(text)
        self.text = text
        return self.wire

    def __call__(self, text: str) -> bytes:
        """The frame bytes of `text`."""
        if text is not self.text:
            return self.build(text)
        return self.wire


#: One per process: the event loop runs one fan-out at a time.
wire_frames = WireFrames()
