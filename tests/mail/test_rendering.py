"""The template engine on its own: escaping, strict variables, sandbox escapes and bounds.

No service involved: `TemplateEngine` renders in its worker threads exactly as the mail service
does. Bounds are checked by outcome (the error), never by measuring time.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from services.core.errors import InvalidArgument
from services.mail.rendering import RENDER_FAILED, RenderLimits, TemplateEngine, TemplateSource


@pytest.fixture
async def engine() -> AsyncIterator[TemplateEngine]:
    """An engine with a short deadline, so that runaway renders end quickly."""
    engine = TemplateEngine(RenderLimits(timeout=0.5, max_output=100_000))
    yield engine
    engine.close()


async def render(
    engine: TemplateEngine,
    html: str = "",
    variables: dict[str, Any] | None = None,
    *,
    subject: str = "s",
    text: str = "",
    defaults: dict[str, Any] | None = None,
) -> Any:
    return await engine.render(TemplateSource(subject, html, text, defaults or {}), variables or {})


async def refused(engine: TemplateEngine, html: str, **kwargs: Any) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        await render(engine, html, **kwargs)
    return caught.value


async def test_html_variables_are_escaped_text_and_subject_are_not(engine: TemplateEngine) -> None:
    # A variable cannot inject markup into the HTML part; the text part keeps it verbatim.
    evil = '<script>alert("x")</script>'
    out = await render(
        engine,
        '<p>Hello {{ name }}</p><a href="{{ name }}">link</a>',
        {"name": evil},
        subject="Hi {{ name }}",
        text="Hello {{ name }}",
    )
    assert "<p>Hello <script>" not in out.html
    assert '<p>Hello &lt;script&gt;alert("x")&lt;/script&gt;</p>' in out.html
    # Inside an attribute the quote cannot close it (a "<" there is only text, as HTML says).
    assert '<a href="<script>alert(&quot;x&quot;)</script>">' in out.html
    assert out.text == f"Hello {evil}"
    assert out.subject == f"Hi {evil}"


async def test_conditionals_loops_filters(engine: TemplateEngine) -> None:
    # The syntax docs/templates.md shows works as documented.
    out = await render(
        engine,
        "{% if vip %}<b>VIP</b>{% endif %}<ul>{% for item in items %}"
        "<li>{{ loop.index }}. {{ item.name | upper }} {{ '%.2f' | format(item.price) }}</li>"
        "{% endfor %}</ul>{{ missing | default('none') }}",
        {"vip": True, "items": [{"name": "pen", "price": 1.5}, {"name": "ink", "price": 3}]},
    )
    assert "<b>VIP</b>" in out.html
    assert "<li>1. PEN 1.50</li><li>2. INK 3.00</li>" in out.html
    assert out.html.rstrip().endswith("none</body></html>")


async def test_missing_variable_is_named(engine: TemplateEngine) -> None:
    # Strict: a variable nobody gave is INVALID_ARGUMENT on variables.<name>.
    error = await refused(engine, "<p>{{ first_name }}</p>")
    assert error.reason == "INVALID_ARGUMENT"
    assert [v.field for v in error.violations] == ["variables.first_name"]


async def test_default_fills_a_missing_variable_and_is_reported(engine: TemplateEngine) -> None:
    out = await render(engine, "<p>{{ greeting }}</p>", defaults={"greeting": "Hello"})
    assert "<p>Hello</p>" in out.html
    assert "default values used for: greeting" in out.warnings
    given = await render(
        engine, "<p>{{ greeting }}</p>", {"greeting": "Hey"}, defaults={"greeting": "Hello"}
    )
    assert "<p>Hey</p>" in given.html


async def test_unused_variable_is_a_warning(engine: TemplateEngine) -> None:
    out = await render(engine, "<p>{{ a }}</p>", {"a": 1, "b": 2})
    assert "variable 'b' is not used by the template" in out.warnings


async def test_css_is_inlined_and_text_generated(engine: TemplateEngine) -> None:
    # <style> rules end up in style attributes (mail clients drop <style>), and a template
    # without text gets a text part made from the HTML.
    out = await render(engine, "<style>p { color: red }</style><p>Total: {{ n }}</p>", {"n": 3})
    assert '<p style="color: red;">Total: 3</p>' in out.html
    assert "<style>" not in out.html
    assert out.text.strip() == "Total: 3"
    assert "text part generated from the HTML" in out.warnings


async def test_linked_stylesheets_are_never_loaded(engine: TemplateEngine, tmp_path: Path) -> None:
    # A <link> to a stylesheet is not followed: not a URL (SSRF), not a file of the server's
    # (whose rules would otherwise show up in the message).
    sheet = tmp_path / "server.css"
    sheet.write_text("p { color: red }")
    fetched: list[str] = []

    async def stylesheet(request: web.Request) -> web.Response:
        fetched.append(request.path)
        return web.Response(text="p { color: red }", content_type="text/css")

    app = web.Application()
    app.router.add_get("/x.css", stylesheet)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        for href in (str(sheet), sheet.as_uri(), f"http://127.0.0.1:{port}/x.css"):
            out = await render(engine, f'<link rel="stylesheet" href="{href}"><p>x</p>')
            assert "<p>x</p>" in out.html
            assert "red" not in out.html
    finally:
        await runner.cleanup()
    assert fetched == []  # a real server that would have served it was never asked


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ name.__class__ }}",
        "{{ self.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ items.append(1) }}",
    ],
)
async def test_python_internals_are_refused(engine: TemplateEngine, source: str) -> None:
    # The sandbox refuses underscore attributes and mutating methods, on variables too.
    error = await refused(engine, source, variables={"name": "x", "items": []})
    assert error.reason == "TEMPLATE_RENDER_FAILED", error
    assert "unsafe" in error.message or "refused" in error.message


async def test_huge_loop_is_stopped_at_the_deadline(engine: TemplateEngine) -> None:
    # 10^10 iterations that print nothing: no size bound helps, the deadline stops the thread.
    error = await refused(
        engine, "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    )
    assert error.reason == "TEMPLATE_RENDER_FAILED"
    assert "took longer than 0.5 s" in error.message
    # The render thread was really stopped: the engine still renders promptly afterwards.
    out = await render(engine, "<p>{{ 1 + 1 }}</p>")
    assert "<p>2</p>" in out.html


def busy_render_threads() -> int:
    """Render threads executing template code right now."""
    frames = sys._current_frames()
    busy = 0
    for thread in threading.enumerate():
        frame = frames.get(thread.ident or 0)
        if not thread.name.startswith("template-render"):
            continue
        while frame is not None:
            if frame.f_code.co_filename == "<template>":
                busy += 1
                break
            frame = frame.f_back
    return busy


async def test_a_render_waiting_past_its_deadline_never_starts() -> None:
    # One render thread, two runaway renders: the second waits for the thread beyond its own
    # deadline, so it is refused without starting (started, nobody would stop it), and the
    # thread is free again afterwards.
    engine = TemplateEngine(RenderLimits(timeout=0.5, threads=1))
    runaway = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    try:
        outcomes = await asyncio.gather(
            *(render(engine, runaway) for _ in range(2)), return_exceptions=True
        )
        assert all(isinstance(o, InvalidArgument) for o in outcomes), outcomes
        assert {o.reason for o in outcomes if isinstance(o, InvalidArgument)} == {RENDER_FAILED}
        assert busy_render_threads() == 0
        out = await render(engine, "<p>{{ 2 * 2 }}</p>")
        assert "<p>4</p>" in out.html
    finally:
        engine.close()


async def test_deep_recursion_is_refused(engine: TemplateEngine) -> None:
    error = await refused(engine, "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}")
    assert error.reason == "TEMPLATE_RENDER_FAILED"
    assert "recursion" in error.message


@pytest.mark.parametrize(
    "source",
    [
        "{{ 'x' * 1000000000 }}",
        "{{ 9 ** 999999999 }}",
        "{{ 'x' | center(1000000000) }}",
        "{{ 'x'.center(1000000000) }}",
        "{{ '%0999999999d' | format(1) }}",
        "{{ '%0999999999d' % 1 }}",
        "{{ '{:>999999999}'.format(1) }}",
        "{% for i in range(100000) %}{{ 'xxxxxxxxxx' }}{% endfor %}",
    ],
)
async def test_output_size_is_bounded(engine: TemplateEngine, source: str) -> None:
    # Each would produce far more than the limit (100,000 characters here): refused before or
    # while producing it, never built in full.
    error = await refused(engine, source)
    assert error.reason == "TEMPLATE_RENDER_FAILED"
    assert "too large" in error.message


async def test_line_break_in_rendered_subject_is_refused(engine: TemplateEngine) -> None:
    # A variable cannot smuggle a header into the message through the subject.
    error = await refused(
        engine, "<p>x</p>", subject="Hi {{ name }}", variables={"name": "x\r\nBcc: a@b.example"}
    )
    assert error.reason == "TEMPLATE_RENDER_FAILED"
    assert "line break" in error.message


def test_syntax_errors_name_part_and_line(engine: TemplateEngine) -> None:
    with pytest.raises(InvalidArgument) as caught:
        engine.check(subject="ok", html="<p>\n{% if x %}</p>", text="{{ }")
    fields = {v.field: v.description for v in caught.value.violations}
    assert set(fields) == {"html", "text"}
    assert fields["html"].startswith("line 2:")
