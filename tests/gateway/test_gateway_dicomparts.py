"""The streaming multipart/related parser of STOW-RS (gateway/dicomparts.py MultipartReader):
parts found whatever the chunking (one byte at a time, delimiters split across chunks),
preamble, transport padding and a part without headers, unread parts skipped, and malformed
bodies refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from atlasflow.gateway import dicomparts as dp

B = "abc123"


def _body(parts: list[tuple[str, bytes]], *, preamble: bytes = b"", padding: bytes = b"") -> bytes:
    out = preamble
    for ctype, content in parts:
        head = f"Content-Type: {ctype}\r\n".encode() if ctype else b""
        out += f"\r\n--{B}".encode() + padding + b"\r\n" + head + b"\r\n" + content
    return out + f"\r\n--{B}--\r\n".encode()


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _read(data: bytes, size: int, *, skip: frozenset[int] = frozenset()) -> list[tuple[dict[str, str], bytes]]:
    async def go() -> list[tuple[dict[str, str], bytes]]:
        reader = dp.MultipartReader(_chunks(data, size), B)
        out = []
        n = 0
        while (headers := await reader.next_part()) is not None:
            got = b""
            if n not in skip:
                async for piece in reader.content():
                    assert len(piece) <= max(size, 1) + len(B) + 4  # never a whole part at once
                    got += piece
            out.append((headers, got))
            n += 1
        return out

    return asyncio.run(go())


# parts whose bytes hold the delimiter's beginnings, CRLFs and dashes
PARTS = [
    ("application/dicom", b"DICM" + bytes(range(256)) * 3),
    ("application/dicom", b"\r\n--abc12\r\n--" + b"x" * 50 + b"\r\n"),
    ("application/dicom", b""),
    ("", b"no headers here"),
]


@pytest.mark.parametrize("size", [1, 2, 7, 64, 100_000])
def test_parts_are_found_whatever_the_chunking(size: int) -> None:
    body = _body(PARTS, preamble=b"ignored preamble", padding=b" \t")
    got = _read(body, size)
    assert [c for _, c in got] == [c for _, c in PARTS]
    assert [h.get("content-type", "") for h, _ in got] == [t for t, _ in PARTS]


def test_the_body_may_start_with_the_delimiter_and_unread_parts_are_skipped() -> None:
    body = _body(PARTS).removeprefix(b"\r\n")
    got = _read(body, 5, skip=frozenset({0, 2}))
    assert [c for _, c in got] == [b"", PARTS[1][1], b"", PARTS[3][1]]


@pytest.mark.parametrize(
    "body",
    [
        b"no delimiter at all",
        f"--{B}\r\nContent-Type: application/dicom\r\n\r\ncut before the end".encode(),
        f"--{B}\r\nContent-Type: application/dicom".encode(),
        f"--{B}junk\r\n\r\nx\r\n--{B}--".encode(),
        f"--{B}\r\n".encode() + b"X-Long: " + b"a" * (dp.MAX_PART_HEADER_BYTES + 10),
    ],
)
def test_malformed_bodies_are_refused(body: bytes) -> None:
    with pytest.raises(dp.MultipartError):
        _read(body, 3)
