"""Validation errors name the field, without pydantic's union-member parts."""

from __future__ import annotations

from rmserve.web.errors import field_path


def test_field_path_drops_union_members() -> None:
    assert field_path(("body", "items", 0, "messages", 1, "user", "content", "str")) == (
        "items.0.messages.1.content"
    )
    assert (
        field_path(
            (
                "body",
                "items",
                2,
                "messages",
                0,
                "user",
                "content",
                "list[tagged-union[TextPart,ImagePart]]",
                1,
                "image_url",
                "image_url",
                "url",
            )
        )
        == "items.2.messages.0.content.1.image_url.url"
    )
    assert field_path(("body", "model")) == "model"
