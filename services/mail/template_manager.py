"""Use cases of email templates: create, edit, publish, preview, and rendering for sends.

Edits change the draft only; publishing freezes the draft as the next numbered version, which
sends use by default. Older versions stay renderable by number. Templates are found by id or by
name (names are unique per tenant, case-insensitive, and never look like an id).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from services.core.clock import Clock
from services.core.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PreconditionViolation,
)
from services.core.ids import decode_page_token, encode_page_token, new_id, page_size
from services.mail.rendering import Rendered, TemplateEngine, TemplateSource
from services.mail.templates import Template, TemplateRepository, TemplateVersion

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_ID_RE = re.compile(r"^[0-9a-f]{24}$")
MAX_SUBJECT = 998
MAX_DEFAULTS = 64 * 1024  # characters of the default variables as JSON


@dataclass(frozen=True, slots=True)
class TemplateDraft:
    """What a create or update gives."""

    name: str
    subject: str
    html: str
    text: str
    defaults: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TemplateUse:
    """A send's template: id or name, version (0: the published one) and variables."""

    ref: str
    version: int = 0
    variables: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TemplatePage:
    """One page of templates."""

    templates: list[Template]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class VersionPage:
    """One page of versions."""

    versions: list[TemplateVersion]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class Preview:
    """A rendered template and the version it came from (0: the draft)."""

    rendered: Rendered
    version: int


@dataclass(frozen=True, slots=True)
class RenderedForSend:
    """A send's rendered content and which template version produced it."""

    rendered: Rendered
    template_id: str
    version: int


class TemplateManager:
    """The template use cases."""

    def __init__(
        self,
        *,
        templates: TemplateRepository,
        engine: TemplateEngine,
        clock: Clock,
        default_page_size: int = 50,
        max_page_size: int = 200,
    ) -> None:
        self._templates = templates
        self._engine = engine
        self._clock = clock
        self._default_page_size = default_page_size
        self._max_page_size = max_page_size

    def _check(self, draft: TemplateDraft) -> None:
        violations: list[FieldViolation] = []
        if not draft.name:
            # PUT replaces the whole draft, name included: leaving it out is the usual slip.
            violations.append(FieldViolation("name", "required (the template's name)"))
        elif not _NAME_RE.match(draft.name):
            violations.append(
                FieldViolation(
                    "name",
                    "1-100 letters, digits, '.', '_' or '-', starting with a letter or digit",
                )
            )
        elif _ID_RE.match(draft.name):
            violations.append(FieldViolation("name", "must not look like a template id"))
        if not draft.subject:
            violations.append(FieldViolation("subject", "required"))
        elif len(draft.subject) > MAX_SUBJECT:
            violations.append(FieldViolation("subject", f"at most {MAX_SUBJECT} characters"))
        if not draft.html and not draft.text:
            violations.append(FieldViolation("html", "html or text is required"))
        if len(json.dumps(draft.defaults)) > MAX_DEFAULTS:
            violations.append(
                FieldViolation("default_variables", f"at most {MAX_DEFAULTS} characters of JSON")
            )
        try:
            self._engine.check(subject=draft.subject, html=draft.html, text=draft.text)
        except InvalidArgument as exc:
            violations.extend(exc.violations)
        if violations:
            raise InvalidArgument(violations)

    async def create(self, *, tenant_id: str, draft: TemplateDraft) -> Template:
        """A new template whose draft is `draft` (not published).

        Raises:
            InvalidArgument: a field is invalid (syntax errors name the part and line).
            AlreadyExists: the name is taken in this tenant.
        """
        self._check(draft)
        now = self._clock.now()
        template = Template(
            id=new_id(),
            tenant_id=tenant_id,
            name=draft.name,
            subject=draft.subject,
            html=draft.html,
            text=draft.text,
            defaults=dict(draft.defaults),
            created_at=now,
            updated_at=now,
        )
        await self._templates.create(template=template)
        return template

    async def get(self, *, tenant_id: str, ref: str, field: str = "id") -> Template:
        """The tenant's template by id or name.

        Raises:
            InvalidArgument: empty reference.
            NotFound: no such template in this tenant.
        """
        if not ref:
            raise InvalidArgument.single(field, "required")
        if _ID_RE.match(ref):
            return await self._templates.get(tenant_id=tenant_id, template_id=ref)
        template = await self._templates.find_by_name(tenant_id=tenant_id, name=ref)
        if template is None:
            raise NotFound("Template", ref)
        return template

    async def list(self, *, tenant_id: str, size: int, page_token: str) -> TemplatePage:
        """A page of the tenant's templates, newest first.

        Raises:
            InvalidArgument: bad page size or token.
        """
        limit = page_size(size, default=self._default_page_size, maximum=self._max_page_size)
        after = decode_page_token(page_token, {"list": "templates"})
        found = await self._templates.page(tenant_id=tenant_id, before_id=after, limit=limit + 1)
        token = ""
        if len(found) > limit:
            found = found[:limit]
            token = encode_page_token(found[-1].id, {"list": "templates"})
        return TemplatePage(found, token)

    async def update(self, *, tenant_id: str, ref: str, draft: TemplateDraft) -> Template:
        """Replace the draft of a template.

        Raises:
            InvalidArgument: a field is invalid.
            NotFound: no such template in this tenant.
            AlreadyExists: the new name is taken.
        """
        template = await self.get(tenant_id=tenant_id, ref=ref)
        self._check(draft)
        previous = template.name
        template.name = draft.name
        template.subject = draft.subject
        template.html = draft.html
        template.text = draft.text
        template.defaults = dict(draft.defaults)
        template.updated_at = self._clock.now()
        await self._templates.update(template=template, previous_name=previous)
        return template

    async def delete(self, *, tenant_id: str, ref: str) -> None:
        """Delete a template and its versions.

        Raises:
            NotFound: no such template in this tenant.
        """
        template = await self.get(tenant_id=tenant_id, ref=ref)
        await self._templates.delete(tenant_id=tenant_id, template_id=template.id)

    async def publish(self, *, tenant_id: str, ref: str) -> TemplateVersion:
        """Freeze the draft as the next version, which becomes the published one.

        Raises:
            NotFound: no such template in this tenant.
        """
        template = await self.get(tenant_id=tenant_id, ref=ref)
        return await self._templates.publish(template=template, now=self._clock.now())

    async def versions(
        self, *, tenant_id: str, ref: str, size: int, page_token: str
    ) -> VersionPage:
        """A page of a template's versions, newest first.

        Raises:
            InvalidArgument: bad page size or token.
            NotFound: no such template in this tenant.
        """
        template = await self.get(tenant_id=tenant_id, ref=ref)
        limit = page_size(size, default=self._default_page_size, maximum=self._max_page_size)
        query = {"template": template.id}
        after = decode_page_token(page_token, query)
        below = None
        if after is not None:
            if not after.isdigit():
                raise InvalidArgument.single("page_token", "invalid page token")
            below = int(after)
        found = await self._templates.versions(template=template, below=below, limit=limit + 1)
        token = ""
        if len(found) > limit:
            found = found[:limit]
            token = encode_page_token(str(found[-1].version), query)
        return VersionPage(found, token)

    async def preview(
        self, *, tenant_id: str, ref: str, version: int, variables: dict[str, Any]
    ) -> Preview:
        """Render the draft (version 0) or a version with sample variables.

        Raises:
            InvalidArgument: a variable is missing or rendering failed (field ``id``).
            NotFound: no such template or version.
        """
        if version < 0:
            raise InvalidArgument.single("version", "must be 0 (the draft) or a version number")
        template = await self.get(tenant_id=tenant_id, ref=ref)
        source = await self._source(template, version, field="version")
        rendered = await self._engine.render(source, variables, field="id")
        return Preview(rendered, version)

    async def render_for_send(self, *, tenant_id: str, use: TemplateUse) -> RenderedForSend:
        """Render what a send asked for: the published version unless it names one.

        Raises:
            InvalidArgument: a variable is missing, rendering failed (field ``template``), or
                the version number is negative.
            NotFound: no such template or version (field ``template``/``template_version``).
            FailedPrecondition: the template was never published and no version was named.
        """
        if use.version < 0:
            raise InvalidArgument.single("template_version", "must be a version number")
        template = await self.get(tenant_id=tenant_id, ref=use.ref, field="template")
        number = use.version or template.published_version
        if number == 0:
            raise FailedPrecondition(
                f"template {template.name!r} has no published version; publish it first",
                reason="TEMPLATE_NOT_PUBLISHED",
                violations=[
                    PreconditionViolation(
                        "TEMPLATE_NOT_PUBLISHED",
                        "template",
                        "POST /api/v1/templates/{id}/publish",
                    )
                ],
                metadata={"field": "template", "templateId": template.id},
            )
        source = await self._source(template, number, field="template_version")
        rendered = await self._engine.render(source, use.variables, field="template")
        return RenderedForSend(rendered, template.id, number)

    async def _source(self, template: Template, version: int, *, field: str) -> TemplateSource:
        if version == 0:
            return TemplateSource(template.subject, template.html, template.text, template.defaults)
        found = await self._templates.version(template=template, number=version)
        return TemplateSource(found.subject, found.html, found.text, found.defaults)


__all__ = [
    "Preview",
    "RenderedForSend",
    "TemplateDraft",
    "TemplateManager",
    "TemplatePage",
    "TemplateUse",
    "VersionPage",
]
