"""Path templates of google/api/http.proto: parsing and matching.

Grammar (from http.proto)::

    Template = "/" Segments [ Verb ] ;
    Segments = Segment { "/" Segment } ;
    Segment  = "*" | "**" | LITERAL | Variable ;
    Variable = "{" FieldPath [ "=" Segments ] "}" ;
    FieldPath = IDENT { "." IDENT } ;
    Verb     = ":" LITERAL ;

``{var}`` is ``{var=*}``. ``**`` matches zero or more segments and may only be last. Matching
ranks candidates segment by segment, left to right: a literal beats ``*``, which beats ``**``,
so ``/api/v1/emails/stats`` wins over ``/api/v1/emails/{id}`` whatever the declaration order
(the preference of Envoy's path matcher, a trie that tries literals first).

Percent-decoding follows http.proto (Envoy's ``url_unescape_spec: ALL_CHARACTERS_EXCEPT_SLASH``):
a variable of one segment is fully decoded, a variable of several segments (``{name=**}``) is
decoded except ``%2F``, which stays encoded so the slashes of the value stay unambiguous.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Characters a literal segment may not contain (they have a meaning in the grammar).
_LITERAL_FORBIDDEN = re.compile(r"[{}*/=:]")
_ENCODED_SLASH = re.compile(r"%2[fF]")


class TemplateError(ValueError):
    """A path template does not follow http.proto's grammar."""


class PathDecodeError(ValueError):
    """A path segment's percent-encoding does not decode to UTF-8."""


class SegmentKind(enum.IntEnum):
    """What a template segment matches; the value is its rank (lower wins)."""

    LITERAL = 0
    SINGLE = 1  # "*": exactly one non-empty segment
    MULTI = 2  # "**": the rest of the path, zero or more segments


@dataclass(frozen=True, slots=True)
class Segment:
    """One template segment."""

    kind: SegmentKind
    literal: str = ""


@dataclass(frozen=True, slots=True)
class Variable:
    """A variable binding the template segments [start, end) to a request field path."""

    field_path: tuple[str, ...]
    start: int
    end: int

    @property
    def name(self) -> str:
        """The dotted field path as written in the template."""
        return ".".join(self.field_path)


@dataclass(frozen=True, slots=True)
class Match:
    """A successful match: the rank (for choosing among templates) and bound values."""

    rank: tuple[int, ...]
    bindings: dict[str, str]


def decode_segment(raw: str, *, keep_slash: bool = False) -> str:
    """Percent-decode one path segment (or a run of segments when `keep_slash`).

    Raises:
        PathDecodeError: the decoded bytes are not UTF-8.
    """
    try:
        if not keep_slash:
            return unquote(raw, errors="strict")
        return "%2F".join(unquote(piece, errors="strict") for piece in _ENCODED_SLASH.split(raw))
    except UnicodeDecodeError:
        raise PathDecodeError(f"path segment {raw!r} is not valid percent-encoded UTF-8") from None


def _split_top_level(text: str) -> list[str]:
    """Split on "/" outside braces (a variable's own segments contain slashes)."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if char == "{":
            depth += 1
            if depth > 1:
                raise TemplateError("variables cannot be nested")
        elif char == "}":
            depth -= 1
            if depth < 0:
                raise TemplateError("unbalanced '}'")
        if char == "/" and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise TemplateError("unbalanced '{'")
    parts.append("".join(current))
    return parts


def _plain_segment(text: str, template: str) -> Segment:
    if text == "*":
        return Segment(SegmentKind.SINGLE)
    if text == "**":
        return Segment(SegmentKind.MULTI)
    if not text:
        raise TemplateError(f"{template!r}: empty segment")
    if _LITERAL_FORBIDDEN.search(text):
        raise TemplateError(f"{template!r}: invalid literal segment {text!r}")
    return Segment(SegmentKind.LITERAL, text)


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """A parsed path template."""

    source: str
    segments: tuple[Segment, ...]
    variables: tuple[Variable, ...]
    verb: str = ""

    @classmethod
    def parse(cls, template: str) -> PathTemplate:
        """Parse a template string.

        Raises:
            TemplateError: the template does not follow the grammar.
        """
        if not template.startswith("/"):
            raise TemplateError(f"{template!r}: a template starts with '/'")
        parts = _split_top_level(template[1:])
        verb = ""
        last = parts[-1]
        # The verb is a ":" after the last segment, outside any variable.
        closing = last.rfind("}")
        colon = last.find(":", closing + 1)
        if colon >= 0:
            verb = last[colon + 1 :]
            parts[-1] = last[:colon]
            if not verb or _LITERAL_FORBIDDEN.search(verb):
                raise TemplateError(f"{template!r}: invalid verb {verb!r}")
        segments: list[Segment] = []
        variables: list[Variable] = []
        names: set[str] = set()
        for part in parts:
            if part.startswith("{"):
                if not part.endswith("}"):
                    raise TemplateError(f"{template!r}: text after a variable in {part!r}")
                path_text, _, sub = part[1:-1].partition("=")
                field_path = tuple(path_text.split("."))
                if not all(_IDENT.match(name) for name in field_path):
                    raise TemplateError(f"{template!r}: invalid field path {path_text!r}")
                if path_text in names:
                    raise TemplateError(f"{template!r}: variable {path_text!r} bound twice")
                names.add(path_text)
                start = len(segments)
                for sub_part in (sub or "*").split("/"):
                    segments.append(_plain_segment(sub_part, template))
                variables.append(Variable(field_path, start, len(segments)))
            else:
                segments.append(_plain_segment(part, template))
        for index, segment in enumerate(segments):
            if segment.kind is SegmentKind.MULTI and index != len(segments) - 1:
                raise TemplateError(f"{template!r}: '**' is only allowed as the last segment")
        return cls(template, tuple(segments), tuple(variables), verb)

    @property
    def field_paths(self) -> list[tuple[str, ...]]:
        """The field paths of the template's variables."""
        return [variable.field_path for variable in self.variables]

    def shape(self) -> tuple[tuple[int, str], ...]:
        """What the template matches, ignoring variable names (to detect duplicates)."""
        return (
            *((int(s.kind), s.literal) for s in self.segments),
            (-1, self.verb),
        )

    def match(self, parts: Sequence[str]) -> Match | None:
        """Match raw (still percent-encoded) path segments, the part after the first "/".

        Raises:
            PathDecodeError: a segment bound to a variable is not valid UTF-8 once decoded.
        """
        if self.verb:
            if not parts or not parts[-1].endswith(":" + self.verb):
                return None
            parts = [*parts[:-1], parts[-1][: -len(self.verb) - 1]]
        ends_with_multi = bool(self.segments) and self.segments[-1].kind is SegmentKind.MULTI
        fixed = len(self.segments) - 1 if ends_with_multi else len(self.segments)
        if len(parts) < fixed or (not ends_with_multi and len(parts) != fixed):
            return None
        for segment, raw in zip(self.segments[:fixed], parts, strict=False):
            if segment.kind is SegmentKind.SINGLE and not raw:
                return None
            if segment.kind is SegmentKind.LITERAL:
                try:
                    if decode_segment(raw) != segment.literal:
                        return None
                except PathDecodeError:
                    return None
        bindings: dict[str, str] = {}
        for variable in self.variables:
            covers_rest = ends_with_multi and variable.end == len(self.segments)
            end = len(parts) if covers_rest else variable.end
            raw_parts = parts[variable.start : end]
            if len(raw_parts) == 1 and not covers_rest:
                bindings[variable.name] = decode_segment(raw_parts[0])
            else:
                bindings[variable.name] = decode_segment("/".join(raw_parts), keep_slash=True)
        # A template with a verb is more specific than the same template without one.
        rank = (*(int(s.kind) for s in self.segments), 0 if self.verb else 1)
        return Match(rank, bindings)
