"""Crop tool: zoom into a region of an image, given a box in 0-1000 relative coordinates.

Boxes follow the Qwen-VL convention: `[x1, y1, x2, y2]`, each in 0-1000 of the image's width or
height, whatever its pixel size. The box maps to pixels rounded outward (so it is never empty);
a box smaller than `CropLimits.min_side_px` is grown around its centre (kept inside the image);
very thin boxes are refused; small crops are upscaled with LANCZOS so the judge model sees them
large, and the output is capped in side and pixel count. Crops are returned RGB.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from rmserve.wire.errors import ItemError, ToolError
from rmserve.wire.images import decode_image

RELATIVE_MAX: Final = 1000.0


class CropArguments(BaseModel):
    """Arguments of the crop (zoom-in) tool."""

    model_config = ConfigDict(extra="forbid")

    image: int = Field(
        default=0,
        description=(
            "Which image to crop, 0-based: the item's images in order, then the crops made "
            "earlier in this conversation."
        ),
    )
    bbox_2d: tuple[float, float, float, float] = Field(
        description=(
            "The region [x1, y1, x2, y2] in relative coordinates from 0 to 1000 (0,0 is the "
            "top-left corner, 1000,1000 the bottom-right), with x1 < x2 and y1 < y2."
        ),
    )


@dataclass(frozen=True)
class CropLimits:
    """Size rules of a crop, in pixels."""

    min_side_px: int = 28  # smaller boxes grow around their centre to this (within the image)
    max_aspect_ratio: float = 20.0  # longer side / shorter side of the box; above: refused
    upscale_to_px: int = 448  # crops with a shorter longer side are upscaled to this
    max_output_px: int = 1024  # cap on the output's longer side
    max_output_pixels: int = 1024 * 28 * 28  # cap on width * height (~1024 Qwen-VL patches)

    def __post_init__(self) -> None:
        sizes = (self.min_side_px, self.upscale_to_px, self.max_output_px, self.max_output_pixels)
        if min(sizes) < 1 or self.max_aspect_ratio < 1:
            raise ValueError(f"invalid crop limits: {self}")


def select_image(images: Sequence[Image.Image], index: int) -> Image.Image:
    """`images[index]`; ToolError("not_found") naming the valid range otherwise."""
    if not 0 <= index < len(images):
        available = f"0 to {len(images) - 1}" if images else "none"
        raise ToolError(
            "not_found", f"image {index} does not exist; the images available are {available}"
        )
    return images[index]


def crop(
    image: Image.Image,
    bbox_2d: Sequence[float],
    limits: CropLimits = CropLimits(),
) -> Image.Image:
    """The region `bbox_2d` of `image` (see the module docstring), as a new RGB image."""
    if image.width < 1 or image.height < 1:
        raise ToolError("invalid_image", f"the image is empty ({image.width}x{image.height})")
    box = pixel_box(bbox_2d, image.width, image.height, limits)
    try:
        region = image.crop(box).convert("RGB")
    except (OSError, ValueError) as exc:
        raise ToolError("invalid_image", f"the image cannot be read: {exc}") from None
    size = output_size(region.width, region.height, limits)
    if size != region.size:
        region = region.resize(size, Image.Resampling.LANCZOS)
    return region


def pixel_box(
    bbox_2d: Sequence[float], width: int, height: int, limits: CropLimits = CropLimits()
) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) pixel box of `bbox_2d`, grown to the minimum size."""
    x1, y1, x2, y2 = _validate_bbox(bbox_2d)
    left, right = _grow(_floor(x1 * width), _ceil(x2 * width), width, limits.min_side_px)
    top, bottom = _grow(_floor(y1 * height), _ceil(y2 * height), height, limits.min_side_px)
    w, h = right - left, bottom - top
    if max(w, h) / min(w, h) > limits.max_aspect_ratio:
        raise ToolError(
            "invalid_arguments",
            f"bbox_2d is {w}x{h} pixels, an aspect ratio of {max(w, h) / min(w, h):.1f}; the "
            f"limit is {limits.max_aspect_ratio:g}: give a less elongated box",
        )
    return left, top, right, bottom


def _validate_bbox(bbox_2d: Sequence[float]) -> tuple[float, float, float, float]:
    if len(bbox_2d) != 4:
        raise ToolError("invalid_arguments", "bbox_2d must be 4 numbers [x1, y1, x2, y2]")
    try:
        x1, y1, x2, y2 = (float(value) for value in bbox_2d)
    except (TypeError, ValueError):
        raise ToolError("invalid_arguments", "bbox_2d must hold numbers") from None
    if not all(0 <= value <= RELATIVE_MAX for value in (x1, y1, x2, y2)):  # False for NaN
        raise ToolError(
            "invalid_arguments",
            f"bbox_2d {list(bbox_2d)} must hold numbers from 0 to 1000 (relative coordinates)",
        )
    if not (x1 < x2 and y1 < y2):
        raise ToolError(
            "invalid_arguments",
            f"bbox_2d {list(bbox_2d)} must be [x1, y1, x2, y2] with x1 < x2 and y1 < y2",
        )
    return x1, y1, x2, y2


def _floor(scaled: float) -> int:
    """floor(scaled / 1000), rounded first so float noise (299.9999...) does not move a pixel."""
    return math.floor(round(scaled / RELATIVE_MAX, 6))


def _ceil(scaled: float) -> int:
    return math.ceil(round(scaled / RELATIVE_MAX, 6))


def _grow(low: int, high: int, size: int, minimum: int) -> tuple[int, int]:
    """[low, high) grown around its centre to `minimum` (at most `size`), kept in [0, size)."""
    low, high = max(low, 0), min(high, size)
    target = min(minimum, size)
    if high - low >= target:
        return low, high
    start = min(max((low + high - target) // 2, 0), size - target)
    return start, start + target


def output_size(width: int, height: int, limits: CropLimits = CropLimits()) -> tuple[int, int]:
    """The size a `width`x`height` crop is resized to: upscaled so its longer side reaches
    `upscale_to_px`, then capped by `max_output_px` and `max_output_pixels`, keeping its shape."""
    longer = max(width, height)
    scale = max(1.0, limits.upscale_to_px / longer)
    scale = min(scale, limits.max_output_px / longer)
    scale = min(scale, math.sqrt(limits.max_output_pixels / (width * height)))
    if scale == 1.0:
        return width, height
    return max(1, math.floor(width * scale + 1e-6)), max(1, math.floor(height * scale + 1e-6))


def image_to_data_url(image: Image.Image) -> str:
    """`image` as a PNG `data:` URL."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_from_data_url(url: str, max_pixels: int) -> Image.Image:
    """Decode a base64 `data:image/...` URL into an RGB image (`rmserve.wire.images.decode_image`:
    the pixel count is read from the header and refused above `max_pixels` before decoding)."""
    try:
        decoded = decode_image(url, max_pixels)
    except ValueError as exc:  # not a base64 image data: URL
        raise ToolError("invalid_arguments", str(exc)) from None
    except ItemError as exc:
        code = "invalid_image" if exc.code == "invalid_image" else "invalid_arguments"
        raise ToolError(code, exc.message) from None
    image: Image.Image = decoded.image
    return image
