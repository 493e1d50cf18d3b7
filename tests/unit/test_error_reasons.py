"""Error reasons are a documented list: the code sends exactly the reasons the protos declare.

Every google.rpc.ErrorInfo reason our code can send is a value of `azora.errors.v1.ErrorReason`
(protos/azora/errors/v1/error_reason.proto), with its meaning, and every declared value is one
the code can send. Read statically from the source of services/ and gateway/: reason literals
(`reason="X"`, `default_reason = "X"`, constants passed as reasons) and the reasons NotFound and
AlreadyExists derive from their resource types. tests/support/error_reasons.py checks the reasons
actually sent while the rest of the suite runs. Every rpc's comment names the reasons it adds to
the ones any rpc can return.
"""

from __future__ import annotations

import ast
import gc
import re
from collections.abc import Iterator
from pathlib import Path

from azora.errors.v1 import error_reason_pb2
from google.protobuf import descriptor_pb2

from services.core.errors import AlreadyExists, NotFound
from tests.support.error_reasons import DECLARED_REASONS

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("services", "gateway")
DESCRIPTOR_SET = ROOT / "gen" / "azora.binpb"
REASON = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*$")
# Resource-typed errors whose reason is derived from the resource type ("Domain" -> DOMAIN_...).
DERIVED: dict[str, type[NotFound] | type[AlreadyExists]] = {
    "NotFound": NotFound,
    "AlreadyExists": AlreadyExists,
}
FILE_SERVICE, SERVICE_METHOD = 6, 2


def _python_files() -> Iterator[Path]:
    for top in SOURCES:
        yield from sorted((ROOT / top).rglob("*.py"))


def _string_constants(files: list[tuple[Path, ast.Module]]) -> dict[str, str]:
    """Module-level ``NAME = "VALUE"`` assignments of every file (constants used as reasons)."""
    constants: dict[str, str] = {}
    for _, tree in files:
        for node in tree.body:
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                constants.update(
                    {t.id: node.value.value for t in node.targets if isinstance(t, ast.Name)}
                )
    return constants


def _strings_in(node: ast.AST, constants: dict[str, str]) -> Iterator[str]:
    for child in ast.walk(node):
        if isinstance(child, ast.Constant) and isinstance(child.value, str):
            yield child.value
        elif isinstance(child, ast.Name) and child.id in constants:
            yield constants[child.id]


def _derived(call: ast.Call) -> Iterator[str]:
    """NotFound("Domain", x) -> DOMAIN_NOT_FOUND, also as NotFound(*("SigningKey", x))."""
    name = call.func.id if isinstance(call.func, ast.Name) else None
    if name not in DERIVED or any(k.arg == "reason" for k in call.keywords):
        return
    first = call.args[0] if call.args else None
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        yield DERIVED[name](first.value, "x").reason


def _resource_tuples(tree: ast.Module) -> Iterator[str]:
    """``resource=("SigningKey", x)`` arguments, later spread into NotFound(*resource)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "resource":
            value = node.value
            if isinstance(value, ast.Tuple) and value.elts:
                first = value.elts[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    yield NotFound(first.value, "x").reason


def _parse(path: Path) -> ast.Module:
    """The module's syntax tree, parsed with the garbage collector paused.

    CPython 3.11's ast.parse is not re-entrant (python/cpython#106905): a collection during it
    can run a finalizer that logs a traceback (asyncio's "Task exception was never retrieved"
    from an earlier test), and formatting that traceback parses source again, which makes the
    outer parse fail with "AST constructor recursion depth mismatch".
    """
    gc.disable()
    try:
        return ast.parse(path.read_text(encoding="utf-8"))
    finally:
        gc.enable()


def reasons_in_code() -> dict[str, set[str]]:
    """Every reason the source can send, with the files that send it."""
    files = [(path, _parse(path)) for path in _python_files()]
    constants = _string_constants(files)
    found: dict[str, set[str]] = {}
    for path, tree in files:
        where = str(path.relative_to(ROOT))
        candidates: list[str] = list(_resource_tuples(tree))
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "reason":
                candidates.extend(_strings_in(node.value, constants))
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = {t.id for t in targets if isinstance(t, ast.Name)}
                if names & {"reason", "default_reason"} and node.value is not None:
                    candidates.extend(_strings_in(node.value, constants))
            elif isinstance(node, ast.Call):
                candidates.extend(_derived(node))
        for reason in candidates:
            if REASON.match(reason):
                found.setdefault(reason, set()).add(where)
    return found


def test_every_reason_the_code_sends_is_declared() -> None:
    found = reasons_in_code()
    assert len(found) > 50  # the scan itself still finds the reasons
    undeclared = {
        reason: sorted(files) for reason, files in found.items() if reason not in DECLARED_REASONS
    }
    assert undeclared == {}, "declare these in protos/azora/errors/v1/error_reason.proto"


def test_every_declared_reason_is_sent_by_the_code() -> None:
    assert DECLARED_REASONS - set(reasons_in_code()) == set(), "a stale reason in ErrorReason"


def test_reason_names_are_the_values_sent() -> None:
    # ErrorInfo carries the value's name, so names are UPPER_SNAKE and 0 means nothing.
    values = error_reason_pb2.ErrorReason.DESCRIPTOR.values
    assert values[0].name == "ERROR_REASON_UNSPECIFIED"
    assert values[0].number == 0
    assert all(REASON.match(v.name) for v in values)


def _rpc_comments() -> Iterator[tuple[str, str]]:
    descriptors = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    for file in descriptors.file:
        if not file.name.startswith("azora/"):
            continue
        comments = {tuple(loc.path): loc.leading_comments for loc in file.source_code_info.location}
        for s, service in enumerate(file.service):
            for m, method in enumerate(service.method):
                path = (FILE_SERVICE, s, SERVICE_METHOD, m)
                yield f"{service.name}.{method.name}", comments.get(path, "")


def test_every_rpc_comment_names_its_reasons() -> None:
    # "Errors: A, B (when ...)." (or "Errors: only the common ones") in each rpc's comment,
    # naming declared reasons only.
    problems: dict[str, str] = {}
    rpcs = list(_rpc_comments())
    assert len(rpcs) > 30
    for rpc, comment in rpcs:
        match = re.search(r"Errors:(.*?)(?:\n\s*\n|$)", comment, flags=re.DOTALL)
        if match is None:
            problems[rpc] = "no 'Errors:' line"
            continue
        # Reason-like words: UPPER_SNAKE with at least one underscore (DNS, TLS are not).
        named = set(re.findall(r"\b[A-Z][A-Z0-9]*_[A-Z0-9_]*[A-Z0-9]\b", match.group(1)))
        unknown = named - DECLARED_REASONS
        if unknown:
            problems[rpc] = f"names undeclared reasons {sorted(unknown)}"
    assert problems == {}
