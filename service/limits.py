"""Per-item input limits, checked by the gateway before any job is made.

Messages and characters per item, images per item and their pixel counts (read from the image
header, so a decompression bomb is refused without being decoded). Images are `data:` URLs; an
http(s) URL is accepted only when it starts with an entry of the allowlist, and the gateway then
fetches it (no redirects, bounded size and time) and passes it on as a `data:` URL, so workers
never fetch anything. Every refusal is a 4xx naming the field.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import httpx

from rmserve.web.errors import PayloadTooLarge, UnprocessableEntity
from rmserve.wire.images import ImageTooLarge, image_size
from rmserve.wire.trajectory import (
    Candidate,
    ImagePart,
    Message,
    TextPart,
    Trajectory,
    decode_data_url,
)


@dataclass(frozen=True)
class ItemLimits:
    max_messages: int
    max_chars: int
    max_images: int
    max_image_pixels: int
    max_image_bytes: int
    url_allowlist: tuple[str, ...] = ()
    fetch_timeout_s: float = 10.0


@dataclass(frozen=True)
class _Image:
    field: str  # "items.3.messages.0.content.1.image_url.url"
    url: str


def check_items(items: Sequence[Trajectory], limits: ItemLimits) -> None:
    """Refuse the request (413 for sizes, 422 for content) if an item breaks a limit."""
    for index, item in enumerate(items):
        where = f"items.{index}"
        messages = len(item.messages) + sum(len(c.messages) for c in item.candidates or [])
        if messages > limits.max_messages:
            raise PayloadTooLarge(
                f"{where}.messages: {messages} messages (with its candidates'); the limit is "
                f"{limits.max_messages}",
                param=f"{where}.messages",
            )
        chars = _characters(item)
        if chars > limits.max_chars:
            raise PayloadTooLarge(
                f"{where} has {chars} characters of text; the limit is {limits.max_chars}",
                param=where,
            )
        images = list(_images(item, where))
        if len(images) > limits.max_images:
            raise PayloadTooLarge(
                f"{where}.messages: {len(images)} images; the limit is {limits.max_images}",
                param=f"{where}.messages",
            )
        for image in images:
            if image.url.startswith("data:"):
                _check_image(image.field, decode_data_url(image.url)[1], limits)
            elif not _allowed(image.url, limits.url_allowlist):
                raise UnprocessableEntity(
                    f"{image.field}: only data: URLs are accepted (data:image/png;base64,...); "
                    "this server fetches remote images only from its allowlist "
                    "(RMSERVE_IMAGE_URL_ALLOWLIST), "
                    + (
                        "which does not hold this URL" if limits.url_allowlist else "which is empty"
                    ),
                    param=image.field,
                )


async def inline_images(items: list[Trajectory], limits: ItemLimits) -> list[Trajectory]:
    """The items with every (allowlisted, already checked) http(s) image URL replaced by the
    data: URL of what it serves."""
    remote = [
        image
        for index, item in enumerate(items)
        for image in _images(item, f"items.{index}")
        if not image.url.startswith("data:")
    ]
    if not remote:
        return items
    async with httpx.AsyncClient(
        timeout=limits.fetch_timeout_s, follow_redirects=False, trust_env=False
    ) as client:
        urls = {image.url: image.field for image in remote}
        data = await asyncio.gather(*(_fetch(client, url, f, limits) for url, f in urls.items()))
        fetched = dict(zip(urls, data, strict=True))
    return [_replace_urls(item, fetched) for item in items]


def _allowed(url: str, allowlist: Sequence[str]) -> bool:
    return any(url.startswith(prefix) for prefix in allowlist)


async def _fetch(client: httpx.AsyncClient, url: str, field: str, limits: ItemLimits) -> str:
    try:
        async with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise UnprocessableEntity(
                    f"{field}: fetching the image gave HTTP {response.status_code} (redirects "
                    "are not followed)",
                    param=field,
                )
            mime = response.headers.get("content-type", "").split(";")[0].strip()
            if not mime.startswith("image/"):
                raise UnprocessableEntity(
                    f"{field}: the URL serves {mime!r}, not an image", param=field
                )
            payload = bytearray()
            async for chunk in response.aiter_bytes():
                payload += chunk
                if len(payload) > limits.max_image_bytes:
                    raise PayloadTooLarge(
                        f"{field}: the image is larger than {limits.max_image_bytes} bytes",
                        param=field,
                    )
    except httpx.HTTPError as exc:
        raise UnprocessableEntity(
            f"{field}: the image could not be fetched: {exc}", param=field
        ) from None
    _check_image(field, bytes(payload), limits)
    return f"data:{mime};base64,{base64.b64encode(payload).decode()}"


def _check_image(field: str, payload: bytes, limits: ItemLimits) -> None:
    if len(payload) > limits.max_image_bytes:
        raise PayloadTooLarge(
            f"{field}: the image has {len(payload)} bytes; the limit is {limits.max_image_bytes}",
            param=field,
        )
    try:
        width, height = image_size(payload)
    except ImageTooLarge as exc:
        raise PayloadTooLarge(f"{field}: {exc}", param=field) from None
    except ValueError as exc:
        raise UnprocessableEntity(
            f"{field}: the image cannot be read: {exc}", param=field
        ) from None
    if width * height > limits.max_image_pixels:
        raise PayloadTooLarge(
            f"{field}: the image is {width}x{height} ({width * height} pixels decoded); the "
            f"limit is {limits.max_image_pixels} pixels",
            param=field,
        )


def _characters(item: Trajectory) -> int:
    texts = [item.reference or ""]
    texts += [document.text for document in item.documents or []]
    for messages in _conversations(item):
        for message in messages:
            content = message.content
            if isinstance(content, str):
                texts.append(content)
            elif content is not None:
                texts += [part.text for part in content if isinstance(part, TextPart)]
            for call in getattr(message, "tool_calls", None) or []:
                texts.append(str(call.function.arguments))
    return sum(len(text) for text in texts)


def _conversations(item: Trajectory) -> Iterator[Sequence[Message]]:
    yield item.messages
    for candidate in item.candidates or []:
        yield candidate.messages


def _images(item: Trajectory, where: str) -> Iterator[_Image]:
    candidates: list[Candidate] = item.candidates or []
    groups = [("messages", item.messages)] + [
        (f"candidates.{c}.messages", candidate.messages) for c, candidate in enumerate(candidates)
    ]
    for name, messages in groups:
        for m, message in enumerate(messages):
            if isinstance(message.content, list):
                for p, part in enumerate(message.content):
                    if isinstance(part, ImagePart):
                        field = f"{where}.{name}.{m}.content.{p}.image_url.url"
                        yield _Image(field, part.image_url.url)


def _replace_urls(item: Trajectory, fetched: dict[str, str]) -> Trajectory:
    def messages(group: Sequence[Message]) -> list[Message]:
        out: list[Message] = []
        for message in group:
            if isinstance(message.content, list) and any(
                isinstance(part, ImagePart) and part.image_url.url in fetched
                for part in message.content
            ):
                parts = [
                    part.model_copy(
                        update={
                            "image_url": part.image_url.model_copy(
                                update={"url": fetched[part.image_url.url]}
                            )
                        }
                    )
                    if isinstance(part, ImagePart) and part.image_url.url in fetched
                    else part
                    for part in message.content
                ]
                message = message.model_copy(update={"content": parts})
            out.append(message)
        return out

    candidates = (
        [c.model_copy(update={"messages": messages(c.messages)}) for c in item.candidates]
        if item.candidates
        else item.candidates
    )
    return item.model_copy(update={"messages": messages(item.messages), "candidates": candidates})
