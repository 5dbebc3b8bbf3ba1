"""Images for vision-language judges: counted, size-checked from the header before decoding
(decompression bombs), decoded to RGB, and refused with the right error when unreadable."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from rmserve.wire.errors import ItemError
from rmserve.wire.images import check_count, decode_image, image_urls
from rmserve.wire.trajectory import Trajectory


def data_url(payload: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode()}"


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with a few bytes of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))  # fmt: skip


def test_decodes_to_rgb_within_the_limit() -> None:
    decoded = decode_image(data_url(png(40, 30, "L")), max_pixels=40 * 30)
    assert decoded.image.mode == "RGB" and decoded.image.size == (40, 30)
    assert decoded.url.startswith("data:image/png;base64,")


@pytest.mark.parametrize(
    ("payload", "code", "says"),
    [
        (png(41, 30), "image_too_large", "41x30 (1230 pixels); the limit is 1200"),
        (bomb_header(100_000, 100_000), "image_too_large", "decompression bomb"),
        (b"not an image at all", "invalid_image", "image 3 cannot be decoded"),
        (png(40, 30)[:60], "invalid_image", "image 3 cannot be decoded"),
    ],
)
def test_refusals_name_the_image_and_the_reason(payload: bytes, code: str, says: str) -> None:
    with pytest.raises(ItemError) as caught:
        decode_image(data_url(payload), max_pixels=1200, number=3)
    assert caught.value.code == code
    assert says in caught.value.message


def test_a_bomb_within_the_configured_limit_is_still_caught_by_pillow() -> None:
    with pytest.raises(ItemError) as caught:
        decode_image(data_url(bomb_header(12_000, 12_000)), max_pixels=10**12)
    assert caught.value.code == "image_too_large"
    assert "decompression bomb" in caught.value.message


def test_images_are_found_in_user_messages_in_order_and_refused_in_candidates() -> None:
    first, second = data_url(png(2, 2)), data_url(png(3, 3))
    item = Trajectory.model_validate({
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": first}},
                                         {"type": "text", "text": "and"},
                                         {"type": "image_url", "image_url": {"url": second}}]},
            {"role": "assistant", "content": "two images"},
        ],
    })  # fmt: skip
    assert image_urls(item.messages) == [first, second]
    check_count([first, second], 2)
    with pytest.raises(ItemError, match="3 images; the limit is 2") as caught:
        check_count([first, second, first], 2)
    assert caught.value.code == "too_many_images"
    pair = Trajectory.model_validate({
        "messages": [{"role": "user", "content": "which?"}],
        "candidates": [
            "plain",
            {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": first}}]}]},
        ],
    })  # fmt: skip
    with pytest.raises(ItemError, match="candidates hold images"):
        image_urls(pair.messages, pair.candidates or [])
