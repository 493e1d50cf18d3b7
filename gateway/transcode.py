"""HTTP/JSON <-> protobuf for one rpc binding, as Envoy's gRPC-JSON transcoder does it.

Request: the body first (``body: "*"`` -> the whole request message, ``body: "field"`` -> that
field, no body -> the body is ignored), then the path variables, then the query parameters.
A path variable or query parameter naming a field the body already set to a different value is
refused (Envoy with ``reject_binding_body_field_collisions: true``; Envoy's default lets the
body win silently, which would let ``PUT /domains/A/smtp`` with ``{"domainId": "B"}`` act on B).

Query parameters (Envoy's defaults): names are field paths in proto or JSON spelling
(``page_size`` or ``pageSize``, ``a.b`` for nested fields); a repeated field takes every
occurrence; enums take their exact proto name (``case_insensitive_enum_parsing: false``) or their
number; bools ``true``/``false``; Timestamps, Durations, FieldMasks and wrappers their JSON
string form; ``+`` is not a space (``query_param_unescape_plus: false``), so an RFC 3339 offset
like ``+02:00`` needs no escaping. A name that is no field is INVALID_ARGUMENT
(``ignore_unknown_query_parameters: false`` with ``reject_unknown_query_parameters: true``).

Response: proto3 JSON with lowerCamelCase names (``json_name``, so ``from``) and every field
without presence printed (Envoy's ``always_print_primitive_fields``; protobuf 7 calls it
``always_print_fields_with_no_presence``); a ``google.api.HttpBody`` is sent raw with its own
content type.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import unquote

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.rpc import code_pb2

from gateway.base64_fields import check_bytes_fields
from gateway.descriptors import (
    HTTP_BODY,
    DescriptorSet,
    FieldPathError,
    HttpBinding,
    descriptor_of,
    is_map_field,
    resolve_field_path,
)
from gateway.errors import GatewayError

# Well-known message types whose JSON form is a scalar, so a path or query value can set them.
_SCALAR_JSON_MESSAGES = frozenset(
    {
        "google.protobuf.Timestamp",
        "google.protobuf.Duration",
        "google.protobuf.FieldMask",
        "google.protobuf.DoubleValue",
        "google.protobuf.FloatValue",
        "google.protobuf.Int64Value",
        "google.protobuf.UInt64Value",
        "google.protobuf.Int32Value",
        "google.protobuf.UInt32Value",
        "google.protobuf.BoolValue",
        "google.protobuf.StringValue",
        "google.protobuf.BytesValue",
    }
)
_INTEGER = re.compile(r"^-?[0-9]+$")
# Deeper than any request message of ours (recursive Struct values carry no fields to check).
_MAX_BODY_DEPTH = 32
# json_format names the field at fault in these shapes; used for BadRequest violations. The
# names are the client's own spelling (JSON or proto name, whichever it sent); "at" is the path
# of the message holding the field, starting with the request message's own name.
_UNKNOWN_FIELD = re.compile(r'has no field named "([^"]+)" at "([^"]+)"')
_BAD_FIELD = re.compile(r"Failed to parse (\S+) field")
_BAD_FIELD_AT = re.compile(r" at ([A-Za-z_][\w\[\]]*(?:\.[A-Za-z_][\w\[\]]*)*)\.*$")
# Media types whose body is JSON (RFC 6839 structured suffixes included).
_JSON_MEDIA_TYPE = re.compile(r"^application/([\w.+-]+\+)?json$")


def parse_query(raw_query: str) -> list[tuple[str, str]]:
    """Split a raw query string into decoded (name, value) pairs, keeping their order.

    Raises:
        GatewayError: a name or value is not valid percent-encoded UTF-8.
    """
    pairs: list[tuple[str, str]] = []
    for item in raw_query.split("&"):
        if not item:
            continue
        name, _, value = item.partition("=")
        try:
            pairs.append((unquote(name, errors="strict"), unquote(value, errors="strict")))
        except UnicodeDecodeError:
            raise GatewayError.invalid(
                f"query parameter {name[:100]!r} is not valid percent-encoded UTF-8",
                reason="INVALID_QUERY_ENCODING",
            ) from None
    return pairs


def _without_root(path: str) -> str:
    """A json_format path without its first step, the request message's name."""
    return path.partition(".")[2]


def _json_problem(exc: Exception, *, default_field: str) -> tuple[str, str, bool]:
    """(field path, message, unknown field?) for a json_format error; the path is best effort."""
    message = str(exc).split("\n", 1)[0]
    unknown = _UNKNOWN_FIELD.search(message)
    if unknown:
        parent = _without_root(unknown.group(2))
        return (f"{parent}.{unknown.group(1)}" if parent else unknown.group(1)), message, True
    at = _BAD_FIELD_AT.search(message)
    if at and _without_root(at.group(1)):
        return _without_root(at.group(1)), message, False
    nested = _BAD_FIELD.findall(message)
    return (".".join(nested) if nested else default_field), message, False


def _object_without_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, refusing a key given twice (json.loads keeps the last one).

    Raises:
        GatewayError: INVALID_JSON_BODY naming the key (its path is not known here).
    """
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise GatewayError.invalid(
                f"{key[:100]!r} is given twice in one JSON object of the request body",
                reason="INVALID_JSON_BODY",
                field=key[:100],
            )
        document[key] = value
    return document


def _refuse_field_given_twice(
    value: Any, descriptor: Descriptor, path: str = "", depth: int = 0
) -> None:
    """Refuse an object giving one field under both its names (``from`` and ``from_address``).

    The Python JSON parser compares keys, not fields, so the later spelling silently replaced
    the earlier value. Unknown keys and wrong types are left to the parser, which names them.

    Raises:
        GatewayError: INVALID_JSON_BODY naming the field by its path.
    """
    if not isinstance(value, dict) or depth > _MAX_BODY_DEPTH:
        return
    by_key = {f.json_name: f for f in descriptor.fields} | {f.name: f for f in descriptor.fields}
    seen: dict[str, str] = {}
    for key, item in value.items():
        field = by_key.get(key)
        if field is None:
            continue
        where = f"{path}.{key}" if path else key
        if field.name in seen:
            raise GatewayError.invalid(
                f"{where!r} is given twice in the request body "
                f"(as {seen[field.name]!r} and {key!r})",
                reason="INVALID_JSON_BODY",
                field=where,
            )
        seen[field.name] = key
        target = field.message_type
        if target is None or target.GetOptions().map_entry:
            continue
        elements = item if field.is_repeated and isinstance(item, list) else [item]
        for i, element in enumerate(elements):
            step = f"{where}[{i}]" if field.is_repeated else where
            _refuse_field_given_twice(element, target, step, depth + 1)


def is_json_media_type(content_type: str) -> bool:
    """Whether a Content-Type header names JSON (parameters such as charset aside)."""
    media_type = content_type.partition(";")[0].strip().lower()
    return bool(_JSON_MEDIA_TYPE.match(media_type))


def _is_set(message: Message, field: FieldDescriptor) -> bool:
    if field.has_presence:
        return message.HasField(field.name)
    return bool(getattr(message, field.name) != field.default_value)


def _message_name(field: FieldDescriptor) -> str:
    """Full name of a message field's type ("" for other fields)."""
    return str(field.message_type.full_name) if field.message_type is not None else ""


def _is_http_body(descriptor: Descriptor) -> bool:
    return bool(descriptor.full_name == HTTP_BODY)


class Transcoder:
    """Builds request messages from HTTP requests and HTTP answers from response messages."""

    def __init__(self, descriptors: DescriptorSet) -> None:
        self._descriptors = descriptors
        self._pool = descriptors.pool

    # -- requests ---------------------------------------------------------------------------

    def build_request(
        self,
        binding: HttpBinding,
        *,
        variables: Mapping[str, str],
        query: Sequence[tuple[str, str]],
        body: bytes,
        content_type: str,
    ) -> Message:
        """The request message of `binding` for one HTTP request.

        Raises:
            GatewayError: INVALID_ARGUMENT naming what is wrong with the body, a path
                variable or a query parameter.
        """
        request_type = binding.method.input_type
        request = self._descriptors.message_class(request_type)()
        if binding.body:
            self._merge_body(binding, request, body, content_type)
        for name, value in variables.items():
            fields = resolve_field_path(request_type, name.split("."))
            self._bind(request, fields, [value], display=name, origin="path")
        grouped: dict[str, list[str]] = {}
        for name, value in query:
            grouped.setdefault(name, []).append(value)
        for name, values in grouped.items():
            try:
                fields = resolve_field_path(request_type, name.split("."))
            except FieldPathError as exc:
                raise GatewayError.invalid(
                    f"unknown query parameter {name!r}: {exc}",
                    reason="UNKNOWN_QUERY_PARAMETER",
                    field=name,
                ) from None
            self._bind(request, fields, values, display=name, origin="query")
        return request

    def _merge_body(
        self, binding: HttpBinding, request: Message, body: bytes, content_type: str
    ) -> None:
        target: Message = request
        target_fields: list[FieldDescriptor] = []
        if binding.body != "*":
            target_fields = resolve_field_path(descriptor_of(request), binding.body.split("."))
        leaf = target_fields[-1] if target_fields else None
        if leaf is None and _is_http_body(descriptor_of(request)):
            self._fill_http_body(request, body, content_type)
            return
        if leaf is not None and not leaf.is_repeated and _message_name(leaf) == HTTP_BODY:
            for field in target_fields:
                target = getattr(target, field.name)
            self._fill_http_body(target, body, content_type)
            return
        if not body.strip():
            return  # an empty body is an empty message, as in Envoy
        if content_type and not is_json_media_type(content_type):
            # A form or text body is not read as JSON by accident (curl -d sends
            # application/x-www-form-urlencoded): the client learns what to send instead.
            raise GatewayError(
                code_pb2.INVALID_ARGUMENT,
                f"the request body must be JSON (Content-Type: application/json), not "
                f"{content_type.partition(';')[0].strip()[:100]!r}",
                reason="UNSUPPORTED_MEDIA_TYPE",
                http_status=415,
                violations=[("body", "send it with Content-Type: application/json")],
            )
        value = self._decode_json(body)
        if leaf is None:
            if not isinstance(value, dict):
                raise GatewayError.invalid(
                    f"the request body must be a JSON object (a {descriptor_of(request).name}), "
                    f"not {_json_kind(value)}",
                    reason="INVALID_JSON_BODY",
                    field="body",
                )
            document: Any = value
        else:
            # Wrap the value in the field path so one ParseDict checks every type on the way.
            document = value
            for field in reversed(target_fields):
                document = {field.name: document}
        check_bytes_fields(document, descriptor_of(request))
        _refuse_field_given_twice(document, descriptor_of(request))
        try:
            # Unknown fields (and unknown enum names) are refused, not dropped: a misspelt
            # `scheduledAt` must not send an email now. Envoy's transcoder has no such option
            # (gateway/README.md).
            json_format.ParseDict(document, request, descriptor_pool=self._pool)
        except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
            field_name, message, unknown = _json_problem(exc, default_field=binding.body)
            if unknown:
                raise GatewayError.invalid(
                    f"unknown field {field_name!r} in the request body: {message}",
                    reason="UNKNOWN_FIELD",
                    field=field_name,
                ) from None
            raise GatewayError.invalid(
                f"invalid request body: {message}", reason="INVALID_JSON_BODY", field=field_name
            ) from None

    @staticmethod
    def _fill_http_body(target: Message, body: bytes, content_type: str) -> None:
        target.content_type = content_type  # type: ignore[attr-defined]
        target.data = body  # type: ignore[attr-defined]

    @staticmethod
    def _decode_json(body: bytes) -> Any:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GatewayError.invalid(
                f"the request body is not valid UTF-8 (byte {exc.start})",
                reason="INVALID_UTF8",
                field="body",
            ) from None
        try:
            return json.loads(text, object_pairs_hook=_object_without_duplicate_keys)
        except json.JSONDecodeError as exc:
            raise GatewayError.invalid(
                f"malformed JSON in the request body: {exc.msg} at line {exc.lineno} "
                f"column {exc.colno}",
                reason="MALFORMED_JSON",
                field="body",
            ) from None
        except (ValueError, RecursionError) as exc:  # too deep, or a number too long
            raise GatewayError.invalid(
                f"the request body cannot be read as JSON: {exc}",
                reason="MALFORMED_JSON",
                field="body",
            ) from None

    def _bind(
        self,
        request: Message,
        fields: list[FieldDescriptor],
        values: list[str],
        *,
        display: str,
        origin: str,
    ) -> None:
        """Set a field from path/query strings, refusing a different value set before."""
        leaf = fields[-1]
        reason = "INVALID_QUERY_PARAMETER" if origin == "query" else "INVALID_PATH_PARAMETER"
        if is_map_field(leaf) or (
            leaf.type == FieldDescriptor.TYPE_MESSAGE
            and _message_name(leaf) not in _SCALAR_JSON_MESSAGES
        ):
            raise GatewayError.invalid(
                f"{display!r} is a message field; it cannot be set from the {origin}",
                reason=reason,
                field=display,
            )
        if not leaf.is_repeated and len(values) > 1:
            raise GatewayError.invalid(
                f"{display!r} is not repeated but was given {len(values)} times",
                reason=reason,
                field=display,
            )
        parent = request
        for field in fields[:-1]:
            parent = getattr(parent, field.name)
        json_values = [self._json_scalar(leaf, value, display, reason) for value in values]
        scratch = type(parent)()
        try:
            json_format.ParseDict(
                {leaf.name: json_values if leaf.is_repeated else json_values[0]},
                scratch,
                descriptor_pool=self._pool,
            )
        except (json_format.ParseError, ValueError, TypeError) as exc:
            detail = str(exc)
            if leaf.enum_type is not None:
                # The parser's own text names only the proto type; say what would be accepted.
                names = [v.name for v in leaf.enum_type.values if v.number != 0]
                got = next((v for v in values if v not in names), values[0])
                detail = f"expected one of {', '.join(names)} (exact names), got {got[:100]!r}"
            raise GatewayError.invalid(
                f"invalid value for {display!r}: {detail}", reason=reason, field=display
            ) from None
        new_value = getattr(scratch, leaf.name)
        if leaf.is_repeated:
            getattr(parent, leaf.name).extend(new_value)
            return
        if _is_set(parent, leaf) and getattr(parent, leaf.name) != new_value:
            raise GatewayError.invalid(
                f"{display!r} in the {origin} differs from the value in the request body",
                reason="BINDING_BODY_COLLISION",
                field=display,
            )
        if leaf.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(parent, leaf.name).CopyFrom(new_value)
        else:
            setattr(parent, leaf.name, new_value)

    @staticmethod
    def _json_scalar(field: FieldDescriptor, value: str, display: str, reason: str) -> Any:
        """The JSON value json_format expects for a field given as text."""
        is_bool = field.type == FieldDescriptor.TYPE_BOOL or (
            _message_name(field) == "google.protobuf.BoolValue"
        )
        if is_bool:
            if value in ("true", "false"):
                return value == "true"
            raise GatewayError.invalid(
                f"invalid value for {display!r}: expected true or false, got {value[:100]!r}",
                reason=reason,
                field=display,
            )
        if field.type == FieldDescriptor.TYPE_ENUM and _INTEGER.match(value):
            return int(value)
        return value

    # -- responses --------------------------------------------------------------------------

    def render_response(self, binding: HttpBinding, response: Message) -> tuple[bytes, str]:
        """(body, content type) of a successful answer."""
        message: Message = response
        if binding.response_body:
            fields = resolve_field_path(descriptor_of(response), binding.response_body.split("."))
            parent = response
            for field in fields[:-1]:
                parent = getattr(parent, field.name)
            leaf = fields[-1]
            value = getattr(parent, leaf.name)
            if leaf.type != FieldDescriptor.TYPE_MESSAGE or leaf.is_repeated:
                printed = json_format.MessageToDict(
                    parent, always_print_fields_with_no_presence=True, descriptor_pool=self._pool
                )
                return _dump(printed.get(leaf.json_name)), "application/json"
            message = value
        if _is_http_body(descriptor_of(message)):
            content_type = message.content_type or "application/octet-stream"  # type: ignore[attr-defined]
            return bytes(message.data), str(content_type)  # type: ignore[attr-defined]
        return self.to_json_bytes(message), "application/json"

    def to_json_bytes(self, message: Message) -> bytes:
        """A message as compact proto3 JSON (lowerCamelCase, primitives always printed)."""
        return _dump(
            json_format.MessageToDict(
                message, always_print_fields_with_no_presence=True, descriptor_pool=self._pool
            )
        )


def _dump(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null"
