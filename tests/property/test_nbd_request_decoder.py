"""RequestDecoder's receive-in-place interface against a model: the request list itself.

However the transport splits the stream (any piece sizes, the buffer offered by
``get_buffer`` filled only partly) and whenever the caller takes the parsed requests
(after every piece, or only now and then, so that unparsed requests pile up in the staging
buffer), the decoder returns exactly the requests that were encoded, payloads included, in
order, and nothing more.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from blockmirror.nbd.constants import Cmd, CmdFlag
from blockmirror.nbd.transmission import Request, RequestDecoder, encode_request

KiB = 1024


class SmallStage(RequestDecoder):
    """The same decoder with a 1 KiB staging buffer, so that small examples cross its
    edges (compaction, growth, payloads that need their own buffer) often."""

    STAGE_SIZE = 1024
    _MIN_ROOM = 64


@st.composite
def request_lists(draw: st.DrawFn) -> list[Request]:
    out = []
    for cookie in range(draw(st.integers(1, 12))):
        cmd = draw(st.sampled_from([Cmd.WRITE, Cmd.WRITE, Cmd.READ, Cmd.FLUSH, Cmd.TRIM]))
        if cmd == Cmd.WRITE:
            # around the 256 KiB staging buffer: payloads that fit, and ones that need their own
            n = draw(st.sampled_from([0, 1, 100, 900, 4 * KiB, 9 * KiB])) + draw(st.integers(0, 3))
            data = bytes([cookie % 251 + 1]) * n
        else:
            n, data = draw(st.integers(0, 1 << 20)), b""
        out.append(Request(int(CmdFlag.FUA) if cookie % 2 else 0, cmd, cookie,
                           draw(st.integers(0, 1 << 40)), n, data))
    return out


@settings(max_examples=300, deadline=None)
@given(reqs=request_lists(), pieces=st.lists(st.integers(1, 6 * KiB), min_size=1),
       fill=st.lists(st.floats(0.01, 1.0), min_size=1), take_every=st.integers(1, 4),
       small=st.booleans())
def test_any_split_gives_back_the_encoded_requests(
    reqs: list[Request], pieces: list[int], fill: list[float], take_every: int, small: bool
) -> None:
    stream = b"".join(encode_request(Cmd(r.type), r.cookie, r.offset, r.length,
                                     CmdFlag(r.flags), r.data) for r in reqs)
    dec = SmallStage() if small else RequestDecoder()
    got: list[Request] = []
    pos = step = 0
    while pos < len(stream):
        assert step < 100_000
        want = pieces[step % len(pieces)]
        while want and pos < len(stream):
            buf = dec.get_buffer()
            assert len(buf) > 0
            # a receive fills part of the offered buffer, as recv_into may
            k = min(len(buf), want, len(stream) - pos,
                    max(1, int(len(buf) * fill[step % len(fill)])))
            buf[:k] = stream[pos : pos + k]
            buf.release()
            dec.buffer_updated(k)
            pos += k
            want -= k
        step += 1
        if step % take_every == 0:
            while (r := dec.next_request()) is not None:
                assert isinstance(r, Request)
                got.append(r)
    while (r := dec.next_request()) is not None:
        assert isinstance(r, Request)
        got.append(r)
    assert got == reqs
    assert dec.buffered == 0
