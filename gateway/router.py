"""The route table: HTTP method + path -> the rpc binding that answers it.

Built from `DescriptorSet.bindings` and nothing else, so an rpc that gains an http rule in
``protos/`` is routable after ``make generate`` without an edit here. Among the templates that
match a path, the most specific wins (see `gateway.templates`). A path that matches only
templates of other HTTP methods is answered like an unknown path: 404, as Envoy's transcoder
with ``reject_unknown_method`` does (it resolves method and path together); the message lists
the methods the path does accept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from google.rpc import code_pb2

from gateway.descriptors import DescriptorSetError, HttpBinding
from gateway.errors import GatewayError
from gateway.templates import PathDecodeError


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """The binding chosen for a request and the values of its path variables (decoded)."""

    binding: HttpBinding
    variables: Mapping[str, str]


class Router:
    """Matches requests against every HTTP binding of the descriptor set."""

    def __init__(self, bindings: Iterable[HttpBinding]) -> None:
        """Index the bindings by HTTP method.

        Raises:
            DescriptorSetError: two bindings answer the same method and path shape.
        """
        self._by_method: dict[str, list[HttpBinding]] = {}
        seen: dict[tuple[str, object], HttpBinding] = {}
        for binding in bindings:
            key = (binding.http_method, binding.template.shape())
            if key in seen:
                other = seen[key]
                raise DescriptorSetError(
                    f"{binding.http_method} {binding.template.source} is bound to both "
                    f"{other.rpc} and {binding.rpc}"
                )
            seen[key] = binding
            self._by_method.setdefault(binding.http_method, []).append(binding)

    @property
    def bindings(self) -> list[HttpBinding]:
        """Every routed binding."""
        return [binding for group in self._by_method.values() for binding in group]

    @staticmethod
    def split(path: str) -> list[str]:
        """The raw segments of a request path (without its query)."""
        return path[1:].split("/") if path.startswith("/") else path.split("/")

    def _best(self, method: str, parts: list[str]) -> RouteMatch | None:
        best: tuple[tuple[int, ...], RouteMatch] | None = None
        for binding in self._by_method.get(method, ()):
            found = binding.template.match(parts)
            if found is not None and (best is None or found.rank < best[0]):
                best = (found.rank, RouteMatch(binding, found.bindings))
        return best[1] if best else None

    def match(self, method: str, raw_path: str) -> RouteMatch:
        """The binding for a request.

        Args:
            method: the HTTP method, upper case.
            raw_path: the path as sent, still percent-encoded, without the query string.

        Raises:
            GatewayError: NOT_FOUND when no binding matches (also when only other methods
                match), INVALID_ARGUMENT when a path variable is not valid UTF-8.
        """
        parts = self.split(raw_path)
        try:
            found = self._best(method.upper(), parts)
            if found is not None:
                return found
            allowed = sorted(
                other
                for other in self._by_method
                if other != method.upper() and self._best(other, parts) is not None
            )
        except PathDecodeError as exc:
            raise GatewayError.invalid(str(exc), reason="INVALID_PATH_ENCODING") from None
        message = f"Could not resolve {raw_path} to a method."
        metadata = {"method": method.upper(), "path": raw_path[:512]}
        if allowed:
            message += f" The path accepts {', '.join(allowed)}."
            metadata["allowed_methods"] = ",".join(allowed)
        raise GatewayError(code_pb2.NOT_FOUND, message, reason="ROUTE_NOT_FOUND", metadata=metadata)
