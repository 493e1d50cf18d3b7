"""Strict base64 for the bytes fields of a JSON request body.

proto3 JSON writes `bytes` as base64 (standard or URL-safe alphabet, padding optional). The
Python protobuf runtime decodes them leniently: characters outside the alphabet are dropped, so
``"content": "not base64!!!"`` became a few bytes or none and an attachment was stored as 0
bytes. Envoy's transcoder (protobuf C++) refuses such values; the local gateway checks every
bytes field of the body the same way before the body is parsed, naming the field as the client
spelled it (``attachments[0].content``).
"""

from __future__ import annotations

import re
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from gateway.errors import GatewayError

_BASE64 = re.compile(r"[A-Za-z0-9+/_-]*={0,2}")  # fullmatch: "$" would allow a final newline
# Well-known messages whose JSON form is a base64 string.
_BYTES_WRAPPER = "google.protobuf.BytesValue"
# Deeper than any request of ours; recursive types (Struct) carry no bytes anyway.
_MAX_DEPTH = 32


def is_base64(text: str) -> bool:
    """Whether `text` is base64 as proto3 JSON allows it (either alphabet, padding optional)."""
    data = text.rstrip("=")
    return bool(_BASE64.fullmatch(text)) and len(data) % 4 != 1 and len(text) - len(data) <= 2


def check_bytes_fields(value: Any, descriptor: Descriptor, path: str = "", depth: int = 0) -> None:
    """Refuse a JSON object (for a message of type `descriptor`) whose bytes fields are not base64.

    Unknown keys and values of the wrong JSON type are left to the parser, which names them.

    Raises:
        GatewayError: INVALID_ARGUMENT naming the first bytes field that is not base64.
    """
    if not isinstance(value, dict) or depth > _MAX_DEPTH:
        return
    by_name = {f.json_name: f for f in descriptor.fields} | {f.name: f for f in descriptor.fields}
    for key, item in value.items():
        field = by_name.get(key)
        if field is None:
            continue
        where = f"{path}.{key}" if path else key
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry_value = field.message_type.fields_by_name["value"]
            if isinstance(item, dict):
                for map_key, map_value in item.items():
                    _check_one(map_value, entry_value, f"{where}[{str(map_key)[:64]!r}]", depth)
        elif field.is_repeated:
            if isinstance(item, list):
                for i, element in enumerate(item):
                    _check_one(element, field, f"{where}[{i}]", depth)
        else:
            _check_one(item, field, where, depth)


def _check_one(value: Any, field: FieldDescriptor, where: str, depth: int) -> None:
    message = field.message_type
    if field.type == FieldDescriptor.TYPE_BYTES or (
        message is not None and message.full_name == _BYTES_WRAPPER
    ):
        if isinstance(value, str) and not is_base64(value):
            raise GatewayError.invalid(
                f"{where} must be base64 (standard or URL-safe alphabet, padding optional)",
                reason="INVALID_BASE64",
                field=where,
            )
    elif message is not None:
        check_bytes_fields(value, message, where, depth + 1)
