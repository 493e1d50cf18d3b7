"""Rendering email templates: Jinja2 in its immutable sandbox, bounded in time and size.

A template has three parts: subject and text are rendered without escaping, HTML with every
variable HTML-escaped (autoescape), so a variable cannot inject markup. Undefined variables are
errors (`StrictUndefined`) unless the template declares a default: a missing variable is
INVALID_ARGUMENT on ``variables.<name>``.

What the sandbox refuses: attributes starting with ``_`` (so ``''.__class__.__mro__`` and
friends), methods that change data, ``range`` above 100,000 items. What it does not bound by
itself is added here:

* time: each render runs in a worker thread; when it outlives its deadline an exception is
  raised inside that thread (``PyThreadState_SetAsyncExc``), which stops any loop of Python
  code (compiled templates are Python code), e.g. nested loops of a billion iterations;
* size: output is produced chunk by chunk and stopped past the limit; ``*`` and ``**`` are
  intercepted (``'x' * 10**10`` would allocate before any chunk exists) and so are calls
  with a huge integer argument (``center(10**9)``);
* recursion: a recursive macro ends with Python's ``RecursionError``, reported as a render
  failure, as does a template nested too deeply to compile.

HTML output then has its CSS inlined (`css_inline`; linked stylesheets are never loaded, neither
URLs nor the server's files) and a text part is generated from it (`inscriptis`) when the
template has no text.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import re
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import css_inline
import jinja2
from inscriptis import get_text
from jinja2 import meta
from jinja2.exceptions import SecurityError, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.core.errors import FieldViolation, InvalidArgument

RENDER_FAILED = "TEMPLATE_RENDER_FAILED"
# A width or precision of seven digits or more in a format string: padding is produced inside
# one C call that no deadline interrupts, so it is refused before the call.
_HUGE_WIDTH = re.compile(r"\d{7,}")
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class RenderLimits:
    """Bounds of one render (all three parts together)."""

    timeout: float = 2.0  # seconds
    max_output: int = 2 * 1024 * 1024  # characters
    max_source: int = 512 * 1024  # characters per part
    max_variables: int = 256 * 1024  # characters of the variables as JSON
    threads: int = 4  # renders at the same time (more wait for a thread, within their time)


@dataclass(frozen=True, slots=True)
class TemplateSource:
    """The parts of a template (a draft or a version) and its default variables."""

    subject: str
    html: str
    text: str
    defaults: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Rendered:
    """A rendered template: what a send stores and delivers."""

    subject: str
    html: str
    text: str
    warnings: list[str]


class _Missing(UndefinedError):
    """A variable the template needs and nobody gave."""

    def __init__(self, name: str, top_level: bool, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.top_level = top_level


class _Undefined(jinja2.StrictUndefined):
    """StrictUndefined that says which variable was missing."""

    def _fail_with_undefined_error(self, *args: Any, **kwargs: Any) -> Any:
        if self._undefined_exception is not UndefinedError:
            # The sandbox answers an unsafe attribute with an undefined carrying SecurityError.
            raise self._undefined_exception(self._undefined_message)
        top_level = self._undefined_obj is jinja2.utils.missing
        raise _Missing(str(self._undefined_name), top_level, self._undefined_message)

    # StrictUndefined lists these dunders as failing; the class-level aliases must point at
    # the override above, not at the base class's function.
    __iter__ = __str__ = __len__ = _fail_with_undefined_error
    __eq__ = __ne__ = __bool__ = __hash__ = __contains__ = _fail_with_undefined_error
    __getattr__ = __getitem__ = __call__ = __add__ = __radd__ = _fail_with_undefined_error


class _OutputTooLarge(Exception):
    """The render produced (or was about to produce) more than the limit."""


class _RenderTimeout(BaseException):
    """Raised inside a render thread that outlived its deadline.

    A BaseException so that no ``except Exception`` inside Jinja's or our code swallows it.
    """


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox plus size bounds on ``*``, ``**`` and integer call arguments."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, *, autoescape: bool, max_output: int) -> None:
        super().__init__(
            autoescape=autoescape,
            undefined=_Undefined,
            keep_trailing_newline=True,
            auto_reload=False,
            cache_size=0,
        )
        self._max_output = max_output

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        """Refuse products and powers whose result would exceed the output limit."""
        if operator == "%":
            if isinstance(left, str) and _HUGE_WIDTH.search(left):
                raise _OutputTooLarge("a width in the format string is too large")
            return self.binop_table["%"](left, right)
        if operator == "**":
            numbers = isinstance(left, int | float) and isinstance(right, int | float)
            if numbers and abs(right) > 64 and abs(left) > 1:
                raise _OutputTooLarge("the power is too large")
            return left**right
        for seq, count in ((left, right), (right, left)):
            repeats = isinstance(seq, str | list | tuple) and isinstance(count, int)
            if repeats and len(seq) * count > self._max_output:
                raise _OutputTooLarge("the repetition is too large")
        return left * right

    def call(self, context: Any, obj: Any, *args: Any, **kwargs: Any) -> Any:
        """Refuse calls with an integer argument beyond the output limit (``center(10**9)``)."""
        for value in (*args, *kwargs.values()):
            number = isinstance(value, int) and not isinstance(value, bool)
            if number and abs(value) > self._max_output:
                raise _OutputTooLarge("an argument is too large")
        # The sandbox hands out str.format wrapped (functools.wraps keeps the bound method).
        method = getattr(obj, "__wrapped__", obj)
        owner = getattr(method, "__self__", None)
        formats = getattr(method, "__name__", "") in ("format", "format_map")
        if isinstance(owner, str) and formats and _HUGE_WIDTH.search(owner):
            raise _OutputTooLarge("a width in the format string is too large")
        return super().call(context, obj, *args, **kwargs)


def _bounded_filter(env: _Sandbox, name: str, max_output: int) -> Callable[..., Any]:
    original = env.filters[name]

    def bounded(*args: Any, **kwargs: Any) -> Any:
        if name == "format" and args and isinstance(args[0], str) and _HUGE_WIDTH.search(args[0]):
            raise _OutputTooLarge("a width in the format string is too large")
        for value in (*args[1:], *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > max_output:
                raise _OutputTooLarge(f"an argument of {name} is too large")
        return original(*args, **kwargs)

    return bounded


def _sandbox(*, autoescape: bool, max_output: int) -> _Sandbox:
    env = _Sandbox(autoescape=autoescape, max_output=max_output)
    # Filters are called directly, not through `call`: bound those with a size argument.
    for name in ("center", "indent", "wordwrap", "truncate", "format", "batch", "slice"):
        if name in env.filters:
            env.filters[name] = _bounded_filter(env, name, max_output)
    # Up to 2 million random words per call, produced in C-speed loops: no use in an email.
    env.globals.pop("lipsum", None)
    return env


class TemplateEngine:
    """Checks template syntax and renders templates within `RenderLimits`."""

    def __init__(self, limits: RenderLimits | None = None) -> None:
        self.limits = limits or RenderLimits()
        self._html = _sandbox(autoescape=True, max_output=self.limits.max_output)
        self._plain = _sandbox(autoescape=False, max_output=self.limits.max_output)
        # Renders run here; a thread stuck in a long C call (bounded by the checks above)
        # occupies one worker, never the event loop.
        self._executor = ThreadPoolExecutor(
            max_workers=self.limits.threads, thread_name_prefix="template-render"
        )
        self._inliner = css_inline.CSSInliner(load_remote_stylesheets=False)
        # Compiled templates and their variable names, by source: compiling costs more than
        # rendering, and a template is sent many times. Compiled templates are immutable, so
        # render threads share them.
        self._compiled: dict[tuple[int, str], jinja2.Template] = {}
        self._names: dict[tuple[str, str, str], frozenset[str]] = {}

    def close(self) -> None:
        """Stop the render threads."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def check(self, *, subject: str, html: str, text: str, prefix: str = "") -> None:
        """Refuse template sources that do not compile, naming the part and line.

        Raises:
            InvalidArgument: a part is too long or has a syntax error (field = the part).
        """
        violations: list[FieldViolation] = []
        for name, source, env in (
            ("subject", subject, self._plain),
            ("html", html, self._html),
            ("text", text, self._plain),
        ):
            if len(source) > self.limits.max_source:
                violations.append(
                    FieldViolation(
                        prefix + name, f"at most {self.limits.max_source} characters allowed"
                    )
                )
                continue
            problem = _syntax_problem(env, source)
            if problem:
                violations.append(FieldViolation(prefix + name, problem))
        if violations:
            raise InvalidArgument(violations)

    async def render(
        self,
        source: TemplateSource,
        variables: Mapping[str, Any],
        *,
        field: str = "template",
    ) -> Rendered:
        """Render all parts with `variables` over the template's defaults.

        Raises:
            InvalidArgument: a variable is missing (``variables.<name>``, reason
                INVALID_ARGUMENT), or rendering failed (`field`, reason TEMPLATE_RENDER_FAILED):
                refused by the sandbox, too large, too long, or an error in the template.
        """
        size = len(json.dumps(variables, default=str))
        if size > self.limits.max_variables:
            raise InvalidArgument.single(
                "variables", f"at most {self.limits.max_variables} characters of JSON allowed"
            )
        values = {**source.defaults, **variables}
        subject, html, text, generated = await self._in_thread(
            lambda: self._render_all(source, values, field), field
        )
        if any(ch in subject for ch in "\r\n\0"):
            raise InvalidArgument(
                [FieldViolation(field, "the rendered subject contains a line break or NUL")],
                reason=RENDER_FAILED,
            )
        referenced = self._referenced(source)
        warnings = [
            f"variable {name!r} is not used by the template"
            for name in sorted(set(variables) - referenced)
        ]
        used_defaults = sorted(k for k in source.defaults if k not in variables and k in referenced)
        if used_defaults:
            warnings.append("default values used for: " + ", ".join(used_defaults))
        if generated:
            warnings.append("text part generated from the HTML")
        return Rendered(subject, html, text, warnings)

    def _render_all(
        self, source: TemplateSource, values: dict[str, Any], field: str
    ) -> tuple[str, str, str, bool]:
        """Subject, HTML (CSS inlined), text (generated when empty); in a render thread."""
        subject, html, text = self._render_parts(source, values, field)
        if html:
            html = self._inline(html, field)
        if not text.strip() and html:
            return subject, html, get_text(html).strip() + "\n", True
        return subject, html, text, False

    def _referenced(self, source: TemplateSource) -> frozenset[str]:
        """Top-level variable names the template's parts use (cached per source)."""
        key = (source.subject, source.html, source.text)
        names = self._names.get(key)
        if names is None:
            found: set[str] = set()
            for text in key:
                if text:
                    try:
                        found |= meta.find_undeclared_variables(self._plain.parse(text))
                    except (TemplateSyntaxError, RecursionError):
                        continue
            names = frozenset(found)
            _remember(self._names, key, names)
        return names

    def _inline(self, html: str, field: str) -> str:
        try:
            return str(self._inliner.inline(html))
        except ValueError as exc:
            raise InvalidArgument(
                [FieldViolation(field, f"CSS could not be inlined: {exc}")], reason=RENDER_FAILED
            ) from None

    def _render_parts(
        self, source: TemplateSource, values: dict[str, Any], field: str
    ) -> tuple[str, str, str]:
        budget = [self.limits.max_output]
        parts = []
        for name, text, env in (
            ("subject", source.subject, self._plain),
            ("html", source.html, self._html),
            ("text", source.text, self._plain),
        ):
            parts.append(_render_one(env, name, text, values, budget, field, self._compiled))
        return parts[0], parts[1], parts[2]

    async def _in_thread(self, work: Callable[[], _T], field: str) -> _T:
        """Run `work` in a render thread; stop it at the deadline."""
        too_long = InvalidArgument(
            [FieldViolation(field, f"rendering took longer than {self.limits.timeout:g} s")],
            reason=RENDER_FAILED,
        )
        # `running` is true exactly while `work` may still run in the thread; the stop is only
        # sent under `lock` while it is, so it can only land inside `run` (the pool's thread
        # goes on serving other renders), never after it.
        lock = threading.Lock()
        state = {"running": False, "abandoned": False, "thread": 0}

        def run() -> _T:
            try:
                with lock:
                    if state["abandoned"]:
                        # Its deadline passed while it waited for a free thread.
                        raise too_long
                    state["running"], state["thread"] = True, threading.get_ident()
                try:
                    return work()
                finally:
                    with lock:
                        state["running"] = False
            except _RenderTimeout:
                raise too_long from None

        future = asyncio.get_running_loop().run_in_executor(self._executor, run)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.limits.timeout)
        except TimeoutError:
            with lock:
                state["abandoned"] = True
                if state["running"]:
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(
                        ctypes.c_ulong(state["thread"]), ctypes.py_object(_RenderTimeout)
                    )
            try:
                # The thread stops at its next bytecode; a bound in case it sits in C code.
                return await asyncio.wait_for(future, 1.0)
            except (TimeoutError, _RenderTimeout):
                raise too_long from None


def _syntax_problem(env: jinja2.Environment, source: str) -> str:
    try:
        env.parse(source)
    except TemplateSyntaxError as exc:
        return f"line {exc.lineno}: {exc.message}"
    except RecursionError:
        return "nested too deeply"
    return ""


def _render_one(
    env: jinja2.Environment,
    part: str,
    source: str,
    values: dict[str, Any],
    budget: list[int],
    field: str,
    compiled: dict[tuple[int, str], jinja2.Template],
) -> str:
    if not source:
        return ""
    try:
        key = (id(env), source)
        template = compiled.get(key)
        if template is None:
            template = env.from_string(source)
            _remember(compiled, key, template)
        chunks: list[str] = []
        for chunk in template.generate(values):
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise _OutputTooLarge("the output is too large")
            chunks.append(chunk)
        return "".join(chunks)
    except _Missing as exc:
        if exc.top_level:
            raise InvalidArgument.single(
                f"variables.{exc.name}", "required by the template (no default declared)"
            ) from None
        raise InvalidArgument.single("variables", f"{part}: {exc}") from None
    except _OutputTooLarge as exc:
        raise InvalidArgument(
            [FieldViolation(field, f"{part}: {exc} (at most {budget_total(env)} characters)")],
            reason=RENDER_FAILED,
        ) from None
    except SecurityError as exc:
        raise InvalidArgument(
            [FieldViolation(field, f"{part}: refused by the sandbox: {exc}")],
            reason=RENDER_FAILED,
        ) from None
    except RecursionError:
        raise InvalidArgument(
            [FieldViolation(field, f"{part}: recursion too deep")], reason=RENDER_FAILED
        ) from None
    except (TemplateSyntaxError, UndefinedError) as exc:
        raise InvalidArgument(
            [FieldViolation(field, f"{part}: {exc}")], reason=RENDER_FAILED
        ) from None
    except (ArithmeticError, TypeError, ValueError, LookupError, AttributeError) as exc:
        # Errors of the template's own logic (1/0, "a" + 1, a bad format string).
        raise InvalidArgument(
            [FieldViolation(field, f"{part}: {type(exc).__name__}: {exc}")],
            reason=RENDER_FAILED,
        ) from None
    except MemoryError:
        raise InvalidArgument(
            [FieldViolation(field, f"{part}: the output is too large")], reason=RENDER_FAILED
        ) from None


_CACHE_ENTRIES = 256
_K = TypeVar("_K")
_V = TypeVar("_V")


def _remember(cache: dict[_K, _V], key: _K, value: _V) -> None:
    """Keep `value`, dropping the oldest entry beyond `_CACHE_ENTRIES` (dicts keep order)."""
    cache[key] = value
    while len(cache) > _CACHE_ENTRIES:
        cache.pop(next(iter(cache)), None)


def budget_total(env: jinja2.Environment) -> int:
    """The output limit of an engine's environment."""
    return env._max_output if isinstance(env, _Sandbox) else 0


__all__ = [
    "RENDER_FAILED",
    "RenderLimits",
    "Rendered",
    "TemplateEngine",
    "TemplateSource",
]
