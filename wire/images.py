"""Images of an item, checked and decoded for a vision-language judge.

Only `data:` URLs reach this point (the trajectory schema refuses others). Limits hold before
any pixel is decoded: the number of images per item, and the pixel count read from the image
header, so a small file that would decompress to gigabytes (a decompression bomb) is refused
without being decoded. Decoding runs off the event loop.
"""

from __future__ import annotations

import asyncio
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rmserve.wire.errors import ItemError
from rmserve.wire.trajectory import Candidate, ImagePart, Message, UserMessage, decode_data_url


@dataclass(frozen=True)
class JudgeImage:
    url: str  # the data: URL as the client sent it (forwarded to remote judges)
    image: Any  # the decoded PIL image, RGB (given to local engines)


def image_urls(messages: Sequence[Message], candidates: Sequence[Candidate] = ()) -> list[str]:
    """The data: URLs of the user messages' image parts, in order. Candidates are responses,
    so images there are refused."""
    if any(_urls(candidate.messages) for candidate in candidates):
        raise ItemError(
            "unsupported_content",
            "candidates hold images; put images in the conversation (`messages`) they answer",
        )
    return _urls(messages)


def _urls(messages: Sequence[Message]) -> list[str]:
    return [
        part.image_url.url
        for message in messages
        if isinstance(message, UserMessage) and isinstance(message.content, list)
        for part in message.content
        if isinstance(part, ImagePart)
    ]


def check_count(urls: Sequence[str], max_images: int) -> None:
    if len(urls) > max_images:
        raise ItemError(
            "too_many_images", f"the item has {len(urls)} images; the limit is {max_images}"
        )


class ImageTooLarge(ValueError):
    """Pillow's own decompression-bomb guard refused the image header."""


def image_size(payload: bytes) -> tuple[int, int]:
    """(width, height) from an encoded image's header, without decoding its pixels; ValueError
    when it is not an image Pillow reads (ImageTooLarge past Pillow's bomb guard)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(payload)) as opened:
            width, height = opened.size
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc)) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"not a readable image: {exc}") from None
    return int(width), int(height)


def decode_image(url: str, max_pixels: int, number: int = 1) -> JudgeImage:
    """Decode one data: URL into an RGB image; ItemError when it is not a readable image or
    has more than `max_pixels` pixels (checked from the header, before decoding)."""
    from PIL import Image, UnidentifiedImageError

    _, payload = decode_data_url(url)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(payload))
            width, height = opened.size
            if width * height > max_pixels:
                raise ItemError(
                    "image_too_large",
                    f"image {number} is {width}x{height} ({width * height} pixels); the limit "
                    f"is {max_pixels} pixels",
                )
            image = opened.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ItemError("image_too_large", f"image {number}: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ItemError("invalid_image", f"image {number} cannot be decoded: {exc}") from None
    return JudgeImage(url, image)


async def decode_images(urls: Sequence[str], max_pixels: int) -> list[JudgeImage]:
    if not urls:
        return []
    return await asyncio.to_thread(
        lambda: [decode_image(url, max_pixels, i + 1) for i, url in enumerate(urls)]
    )
