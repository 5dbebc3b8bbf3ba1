"""Crops of a generated 1000x500 image: pixel boxes, content, size rules and data URLs."""

from __future__ import annotations

import base64
import io
import math

import pytest
from PIL import Image, ImageDraw, ImageFile
from pydantic import ValidationError

from rmserve.sandbox.crop import (
    CropArguments,
    CropLimits,
    crop,
    image_from_data_url,
    image_to_data_url,
    output_size,
    pixel_box,
    select_image,
)
from rmserve.wire.errors import ToolError

RED, GREEN, BLUE, YELLOW, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255,) * 3
RECTANGLE = (600, 100, 700, 150)  # white, inside the green quadrant; right/bottom exclusive


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """1000x500: red, green / blue, yellow quadrants, and a white 100x50 rectangle."""
    picture = Image.new("RGB", (1000, 500))
    draw = ImageDraw.Draw(picture)
    draw.rectangle((0, 0, 499, 249), fill=RED)
    draw.rectangle((500, 0, 999, 249), fill=GREEN)
    draw.rectangle((0, 250, 499, 499), fill=BLUE)
    draw.rectangle((500, 250, 999, 499), fill=YELLOW)
    x1, y1, x2, y2 = RECTANGLE
    draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=WHITE)
    return picture


def colors(picture: Image.Image) -> set[object]:
    """The distinct pixel values of an RGB image."""
    return {color for _, color in picture.getcolors(maxcolors=1 << 20) or []}


@pytest.mark.parametrize(
    ("bbox", "box"),
    [
        ([0, 0, 500, 500], (0, 0, 500, 250)),
        ([500, 500, 1000, 1000], (500, 250, 1000, 500)),
        ([0, 0, 1000, 1000], (0, 0, 1000, 500)),
        ([250, 250, 750, 750], (250, 125, 750, 375)),
        ([100.5, 100.1, 300.2, 300.3], (100, 50, 301, 151)),  # rounded outward
        ([600, 200, 700, 300], RECTANGLE),
    ],
)
def test_pixel_box(bbox: list[float], box: tuple[int, int, int, int]) -> None:
    assert pixel_box(bbox, 1000, 500) == box


def test_whole_image_of_odd_size() -> None:
    assert pixel_box([0, 0, 1000, 1000], 999, 333) == (0, 0, 999, 333)
    assert pixel_box([0, 0, 333.3, 1000], 999, 333) == (0, 0, 333, 333)


def test_quadrant_crops_are_the_exact_regions(image: Image.Image) -> None:
    top_left = crop(image, [0, 0, 500, 500])
    assert top_left.size == (500, 250)
    assert colors(top_left) == {RED}
    assert colors(crop(image, [0, 500, 500, 1000])) == {BLUE}
    assert colors(crop(image, [500, 500, 1000, 1000])) == {YELLOW}
    top_right = crop(image, [500, 0, 1000, 500])
    assert top_right.tobytes() == image.crop((500, 0, 1000, 250)).tobytes()
    assert top_right.getpixel((150, 125)) == WHITE  # the rectangle, at (600, 100) - (500, 0)
    assert top_right.getpixel((50, 50)) == GREEN


def test_small_crop_is_upscaled_with_its_shape(image: Image.Image) -> None:
    zoomed = crop(image, [600, 200, 700, 300])  # exactly the 100x50 white rectangle
    assert zoomed.size == (448, 224)
    assert colors(zoomed) == {WHITE}
    assert zoomed.mode == "RGB"


def test_crop_across_a_border_keeps_both_sides(image: Image.Image) -> None:
    zoomed = crop(image, [450, 400, 550, 600])  # 100x100 around the centre of the image
    assert zoomed.size == (448, 448)
    assert zoomed.getpixel((10, 10)) == RED
    assert zoomed.getpixel((437, 10)) == GREEN
    assert zoomed.getpixel((10, 437)) == BLUE
    assert zoomed.getpixel((437, 437)) == YELLOW


@pytest.mark.parametrize(
    ("bbox", "box"),
    [
        ([0, 0, 1, 1], (0, 0, 28, 28)),  # top-left corner: grows right and down
        ([999, 999, 1000, 1000], (972, 472, 1000, 500)),  # bottom-right corner
        ([500, 500, 501, 501], (486, 236, 514, 264)),  # centre: grows both ways
        ([0, 0, 1000, 2], (0, 0, 1000, 28)),  # only the short side grows
    ],
)
def test_tiny_boxes_grow_to_the_minimum_side(bbox: list[float], box: tuple[int, ...]) -> None:
    assert pixel_box(bbox, 1000, 500, CropLimits(max_aspect_ratio=100)) == box


def test_tiny_crop_output(image: Image.Image) -> None:
    zoomed = crop(image, [999, 999, 1000, 1000])
    assert zoomed.size == (448, 448)
    assert colors(zoomed) == {YELLOW}


def test_image_smaller_than_the_minimum_side() -> None:
    small = Image.new("RGB", (20, 10), GREEN)
    assert pixel_box([0, 0, 100, 100], 20, 10) == (0, 0, 20, 10)
    assert crop(small, [0, 0, 100, 100]).size == (448, 224)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((500, 250), (500, 250)),  # already large enough: untouched
        ((100, 50), (448, 224)),  # upscaled, longer side to 448
        ((50, 100), (224, 448)),
        ((300, 20), (448, 29)),
        ((447, 447), (448, 448)),
        ((1024, 100), (1024, 100)),
        ((3000, 2000), (1024, 682)),  # longer side capped
        ((2000, 2000), (896, 896)),  # pixel count capped (1024 * 28 * 28)
    ],
)
def test_output_size(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert output_size(*size) == expected
    width, height = output_size(*size)
    assert max(width, height) <= 1024
    assert width * height <= 1024 * 28 * 28


def test_large_crop_is_capped() -> None:
    big = Image.new("RGB", (3000, 2000), BLUE)
    assert crop(big, [0, 0, 1000, 1000]).size == (1024, 682)
    limits = CropLimits(max_output_px=300, max_output_pixels=30_000)
    out = crop(big, [0, 0, 1000, 1000], limits)
    assert max(out.size) <= 300
    assert out.width * out.height <= 30_000
    assert math.isclose(out.width / out.height, 1.5, rel_tol=0.02)


def test_other_modes_become_rgb() -> None:
    for mode in ("RGBA", "P", "L", "1", "I;16", "CMYK"):
        assert crop(Image.new(mode, (60, 60)), [0, 0, 1000, 1000]).mode == "RGB"


def test_aspect_ratio(image: Image.Image) -> None:
    assert crop(image, [0, 0, 1000, 100]).size == (1000, 50)  # 20:1, at the limit
    with pytest.raises(ToolError) as caught:
        crop(image, [0, 0, 1000, 10])  # 1000x5, grown to 1000x28: 35.7:1
    assert caught.value.code == "invalid_arguments"
    assert "aspect ratio of 35.7" in caught.value.message
    assert "bbox_2d" in caught.value.message


@pytest.mark.parametrize(
    "bbox",
    [
        [500, 0, 100, 100],  # x1 > x2
        [0, 500, 100, 100],  # y1 > y2
        [100, 100, 100, 200],  # empty
        [-1, 0, 100, 100],
        [0, 0, 1001, 100],
        [0, 0, 100, math.nan],
        [0, 0, math.inf, 100],
        [0, 0, 100],
        [0, 0, 100, 100, 100],
        ["a", 0, 100, 100],
    ],
)
def test_invalid_bbox(image: Image.Image, bbox: list[object]) -> None:
    with pytest.raises(ToolError) as caught:
        crop(image, bbox)  # type: ignore[arg-type]
    assert caught.value.code == "invalid_arguments"
    assert "bbox_2d" in caught.value.message


def test_empty_image() -> None:
    with pytest.raises(ToolError) as caught:
        crop(Image.new("RGB", (0, 0)), [0, 0, 1000, 1000])
    assert caught.value.code == "invalid_image"


def test_select_image(image: Image.Image) -> None:
    assert select_image([image], 0) is image
    for index, images in ((1, [image]), (-1, [image]), (0, [])):
        with pytest.raises(ToolError) as caught:
            select_image(images, index)
        assert caught.value.code == "not_found"
        assert f"image {index}" in caught.value.message


def test_arguments_model() -> None:
    arguments = CropArguments.model_validate({"bbox_2d": [1, 2, 3, 4]})
    assert arguments.image == 0
    assert arguments.bbox_2d == (1.0, 2.0, 3.0, 4.0)
    for bad in ({"bbox_2d": [1, 2, 3]}, {"bbox_2d": [1, 2, 3, 4], "zoom": 2}, {"image": 0}):
        with pytest.raises(ValidationError):
            CropArguments.model_validate(bad)
    schema = CropArguments.model_json_schema()
    assert "0 to 1000" in schema["properties"]["bbox_2d"]["description"]


def test_data_url_round_trip(image: Image.Image) -> None:
    url = image_to_data_url(image)
    assert url.startswith("data:image/png;base64,")
    decoded = image_from_data_url(url, max_pixels=500_000)
    assert decoded.mode == "RGB"
    assert decoded.tobytes() == image.tobytes()
    rgba = Image.new("RGBA", (4, 4), (1, 2, 3, 255))
    assert image_from_data_url(image_to_data_url(rgba), 16).getpixel((0, 0)) == (1, 2, 3)


def png_url(picture: Image.Image, keep: float = 1.0) -> str:
    """A PNG data: URL of `picture`, of which only the first `keep` fraction of bytes."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    data = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(data[: int(len(data) * keep)]).decode()


def test_too_many_pixels_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    url = png_url(Image.new("1", (3000, 3000)))

    def no_decoding(*_: object) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ToolError) as caught:
        image_from_data_url(url, max_pixels=1_000_000)
    assert caught.value.code == "invalid_arguments"
    assert "3000x3000" in caught.value.message


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("https://example.com/cat.png", "invalid_arguments"),
        ("data:text/plain;base64,aGVsbG8=", "invalid_arguments"),
        ("data:image/png,rawbytes", "invalid_arguments"),
        ("data:image/png;base64,@@@@", "invalid_arguments"),
        ("data:image/png;base64,aGVsbG8gd29ybGQ=", "invalid_image"),  # "hello world"
    ],
)
def test_bad_data_urls(url: str, code: str) -> None:
    with pytest.raises(ToolError) as caught:
        image_from_data_url(url, max_pixels=1_000_000)
    assert caught.value.code == code


def test_truncated_image() -> None:
    noise = Image.effect_noise((64, 64), 50).convert("RGB")  # incompressible, so many bytes
    with pytest.raises(ToolError) as caught:
        image_from_data_url(png_url(noise, keep=0.5), max_pixels=1_000_000)
    assert caught.value.code == "invalid_image"
