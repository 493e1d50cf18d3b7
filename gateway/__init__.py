"""The local REST gateway: HTTP/JSON -> gRPC transcoding from the descriptor set alone.

Production REST goes through Envoy's gRPC-JSON transcoder (``gateway/envoy.yaml``). On one
machine without Envoy this package does the same job from the same ``gen/azora.binpb``: the
``google.api.http`` annotations of ``protos/`` are its routing table, and no REST route or
handler is written by hand. The only routes that are not transcoded are ``/api-docs``,
``/api-docs/`` (Swagger UI), ``/api-docs/openapi.json`` and the Swagger UI assets under
``/api-docs/``.

Behaviour, and where it follows an Envoy setting rather than Envoy's default (the settings
``gateway/envoy.yaml`` should use for the two to agree):

* Routing: literal segments beat ``*``, which beats ``**``; a path that exists only for other
  HTTP methods is 404, not 405 (Envoy resolves method and path together:
  ``request_validation_options.reject_unknown_method: true``); an unknown path is 404 with a
  google.rpc.Status body (code 5).
* Path variables: ``{var}`` fully percent-decoded, ``{var=**}`` decoded except ``%2F``
  (http.proto's rule; Envoy ``url_unescape_spec: ALL_CHARACTERS_EXCEPT_SLASH``, whose default
  ``ALL_CHARACTERS_EXCEPT_RESERVED`` also keeps other reserved characters encoded).
* Query parameters: proto or JSON field names, nested ``a.b``, repeated by repetition, enums by
  exact proto name or number (``case_insensitive_enum_parsing: false``), ``+`` is literal
  (``query_param_unescape_plus: false``); an unknown name is 400 (Envoy
  ``ignore_unknown_query_parameters: false`` with
  ``request_validation_options.reject_unknown_query_parameters: true``; without the latter
  Envoy passes such a request through untranscoded).
* Body: unknown JSON fields are dropped silently, as Envoy 1.39's transcoder does (no option
  changes that; tests/deploy checks it against a real Envoy); a path or query value that
  contradicts the body is 400 (``reject_binding_body_field_collisions: true``; Envoy's default
  lets the body win). An empty body is an empty message.
* Oversized body (``AZORA_GATEWAY_MAX_BODY_BYTES``, default 64 MiB = the services' gRPC
  receive limit, like Envoy's ``max_request_body_size``): 413 with an INVALID_ARGUMENT Status
  (reason ``REQUEST_BODY_TOO_LARGE``), which is what Envoy's local_reply_config in
  gateway/envoy.yaml makes of its own 413.
* Rate limits are the services' (services/core/ratelimit.py): their ``ratelimit-*`` and
  ``retry-after`` response metadata become HTTP headers; the client address reaches them as
  ``x-forwarded-for`` with the peer appended.
* Malformed JSON, invalid UTF-8, wrong types: 400 with a google.rpc.Status JSON body
  (code 3, an ErrorInfo in domain ``gateway.azora.dev``, a BadRequest field violation). Envoy
  sends its own local replies for these as text/plain unless a ``local_reply_config`` formats
  them; the status codes are the same.
* Success is always 200 with proto3 JSON (lowerCamelCase, fields without presence always
  printed: ``print_options.always_print_primitive_fields: true``); ``google.api.HttpBody`` is
  sent raw with its content type.
* Errors: ``convert_grpc_status: true`` behaviour: google.rpc.Status JSON from the
  ``grpc-status-details-bin`` trailer (or code + message without it), HTTP status by
  google/rpc/code.proto. In addition the gateway sets ``Retry-After`` from a RetryInfo detail
  on 429 and 503 (Envoy does not).
* Headers: ``authorization``, ``x-api-key``, ``x-request-id``, ``traceparent``, ``tracestate``
  and ``x-forwarded-for`` (with the peer appended) go to the services as metadata; Envoy
  forwards every request header. ``x-request-id`` is generated when absent or malformed and
  returned on every response (Envoy: ``generate_request_id`` and
  ``always_set_request_id_in_response``); other upstream response metadata is not copied.
* Unary rpcs only: a streaming rpc with an http rule is routed but answers 501 (Envoy
  transcodes streams).
"""

from gateway.app import create_app
from gateway.config import GatewayConfig

__all__ = ["GatewayConfig", "create_app"]
