"""Storage of email templates and their published versions (written only by the mail service).

Collections:
* ``templates``: one document per template: its draft (name, subject, html, text, default
  variables as JSON text: variable names may hold ``$`` or ``.``, which keys may not) and a hint
  of the latest published version number.
* ``template_names``: the name claim, ``_id`` = tenant + lower-cased name. A unique insert is
  what makes names unique per tenant on FerretDB too (its conditional writes are not atomic).
* ``template_versions``: frozen copies of a draft, ``_id`` = template id + ``:`` + number. A
  publish inserts the next number; two concurrent publishes meet on the unique ``_id`` and the
  loser takes the following number, so no number is ever given twice. The latest version is
  the highest number stored: the template's hint is only where the search starts (probing the
  next ``_id``s), so a hint written late by a slower publish never hides a newer version.

Reads go by ``_id`` only (the one filter FerretDB 1.24 serves from an index); the tenant is
checked on the document. Deleting removes the template first (it is gone for every reader),
then its versions, then its name claim; a claim left by a crash in between points at a template
that no longer exists and is taken over by the next create with that name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.database import AsyncDatabase

from services.core.errors import AlreadyExists, NotFound
from services.core.mongo import Document, IndexSpec, is_duplicate_key

TEMPLATES = "templates"
TEMPLATE_NAMES = "template_names"
TEMPLATE_VERSIONS = "template_versions"
# Versions probed past the stored hint before concluding which is the latest.
_MAX_PROBES = 64

INDEXES = (
    IndexSpec(TEMPLATES, [("tenant_id", ASCENDING), ("_id", DESCENDING)], "template_tenant"),
    IndexSpec(
        TEMPLATE_VERSIONS,
        [("template_id", ASCENDING), ("version", DESCENDING)],
        "template_version_order",
    ),
)


@dataclass(slots=True)
class Template:
    """A template's draft and its published version number (0: never published)."""

    id: str
    tenant_id: str
    name: str
    subject: str
    html: str
    text: str
    defaults: dict[str, Any] = field(default_factory=dict)
    published_version: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class TemplateVersion:
    """A frozen copy of a template's draft."""

    template_id: str
    tenant_id: str
    version: int
    subject: str
    html: str
    text: str
    defaults: dict[str, Any]
    created_at: datetime


class TemplateRepository(Protocol):
    """Tenant-scoped storage of templates and versions."""

    async def create(self, *, template: Template) -> None:
        """Store a new template.

        Raises:
            AlreadyExists: the tenant has a template of this name.
        """
        ...

    async def get(self, *, tenant_id: str, template_id: str) -> Template:
        """The tenant's template, with its latest published version.

        Raises:
            NotFound: no such template in this tenant.
        """
        ...

    async def find_by_name(self, *, tenant_id: str, name: str) -> Template | None:
        """The tenant's template of this name (case-insensitive), if any."""
        ...

    async def update(self, *, template: Template, previous_name: str) -> None:
        """Replace the draft (and name) of an existing template.

        Raises:
            NotFound: the template no longer exists.
            AlreadyExists: the new name is taken.
        """
        ...

    async def delete(self, *, tenant_id: str, template_id: str) -> None:
        """Remove a template, its versions and its name.

        Raises:
            NotFound: no such template in this tenant.
        """
        ...

    async def page(self, *, tenant_id: str, before_id: str | None, limit: int) -> list[Template]:
        """A page of the tenant's templates, newest first."""
        ...

    async def publish(self, *, template: Template, now: datetime) -> TemplateVersion:
        """Freeze the draft as the next version number (unique even under concurrency)."""
        ...

    async def version(self, *, template: Template, number: int) -> TemplateVersion:
        """One version of the template.

        Raises:
            NotFound: no such version.
        """
        ...

    async def versions(
        self, *, template: Template, below: int | None, limit: int
    ) -> list[TemplateVersion]:
        """Versions numbered below `below` (None: all), newest first."""
        ...


def _name_key(tenant_id: str, name: str) -> str:
    return f"{tenant_id}\x1f{name.lower()}"


def _version_id(template_id: str, number: int) -> str:
    return f"{template_id}:{number}"


def _template_doc(t: Template) -> Document:
    return {
        "_id": t.id,
        "tenant_id": t.tenant_id,
        "name": t.name,
        "subject": t.subject,
        "html": t.html,
        "text": t.text,
        "defaults": json.dumps(t.defaults),
        "published_version": t.published_version,
        "created_at": t.created_at,
        "updated_at": t.updated_at,
    }


def _template(doc: Document) -> Template:
    return Template(
        id=doc["_id"],
        tenant_id=doc["tenant_id"],
        name=doc["name"],
        subject=doc["subject"],
        html=doc["html"],
        text=doc["text"],
        defaults=json.loads(doc.get("defaults") or "{}"),
        published_version=int(doc.get("published_version", 0)),
        created_at=doc.get("created_at"),
        updated_at=doc.get("updated_at"),
    )


def _version(doc: Document) -> TemplateVersion:
    return TemplateVersion(
        template_id=doc["template_id"],
        tenant_id=doc["tenant_id"],
        version=int(doc["version"]),
        subject=doc["subject"],
        html=doc["html"],
        text=doc["text"],
        defaults=json.loads(doc.get("defaults") or "{}"),
        created_at=doc["created_at"],
    )


class MongoTemplateRepository:
    """`TemplateRepository` on MongoDB/FerretDB."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._templates = db[TEMPLATES]
        self._names = db[TEMPLATE_NAMES]
        self._versions = db[TEMPLATE_VERSIONS]

    async def _claim_name(self, tenant_id: str, name: str, template_id: str) -> None:
        key = _name_key(tenant_id, name)
        for _ in range(3):
            try:
                await self._names.insert_one(
                    {"_id": key, "tenant_id": tenant_id, "template_id": template_id}
                )
                return
            except Exception as exc:
                if not is_duplicate_key(exc):
                    raise
            holder = await self._names.find_one({"_id": key})
            if holder is None:
                continue  # released meanwhile: try again
            if holder["template_id"] == template_id:
                return  # ours already (a retried request)
            if await self._templates.find_one({"_id": holder["template_id"]}, {"_id": 1}):
                raise AlreadyExists(
                    "Template", name, message=f"a template named {name!r} already exists"
                )
            # Left by a delete that crashed before releasing it: take it over (only if it
            # still names that template, so two takers cannot both win).
            await self._names.delete_one({"_id": key, "template_id": holder["template_id"]})
        raise AlreadyExists("Template", name, message=f"a template named {name!r} already exists")

    async def _release_name(self, tenant_id: str, name: str, template_id: str) -> None:
        await self._names.delete_one(
            {"_id": _name_key(tenant_id, name), "template_id": template_id}
        )

    async def create(self, *, template: Template) -> None:
        """See `TemplateRepository.create`."""
        await self._claim_name(template.tenant_id, template.name, template.id)
        try:
            await self._templates.insert_one(_template_doc(template))
        except Exception:
            await self._release_name(template.tenant_id, template.name, template.id)
            raise

    async def _own(self, tenant_id: str, template_id: str) -> Document | None:
        doc = await self._templates.find_one({"_id": template_id})
        if doc is None or doc.get("tenant_id") != tenant_id:
            return None
        return doc

    async def get(self, *, tenant_id: str, template_id: str) -> Template:
        """See `TemplateRepository.get`."""
        doc = await self._own(tenant_id, template_id)
        if doc is None:
            raise NotFound("Template", template_id)
        template = _template(doc)
        template.published_version = await self._latest(template.id, template.published_version)
        return template

    async def _latest(self, template_id: str, hint: int) -> int:
        latest = hint
        for _ in range(_MAX_PROBES):
            found = await self._versions.find_one(
                {"_id": _version_id(template_id, latest + 1)}, {"_id": 1}
            )
            if found is None:
                break
            latest += 1
        return latest

    async def find_by_name(self, *, tenant_id: str, name: str) -> Template | None:
        """See `TemplateRepository.find_by_name`."""
        holder = await self._names.find_one({"_id": _name_key(tenant_id, name)})
        if holder is None:
            return None
        try:
            return await self.get(tenant_id=tenant_id, template_id=holder["template_id"])
        except NotFound:
            return None

    async def update(self, *, template: Template, previous_name: str) -> None:
        """See `TemplateRepository.update`."""
        renamed = template.name.lower() != previous_name.lower()
        if renamed:
            await self._claim_name(template.tenant_id, template.name, template.id)
        doc = _template_doc(template)
        del doc["_id"], doc["created_at"], doc["published_version"]
        result = await self._templates.update_one({"_id": template.id}, {"$set": doc})
        if result.matched_count == 0:
            if renamed:
                await self._release_name(template.tenant_id, template.name, template.id)
            raise NotFound("Template", template.id)
        if renamed:
            await self._release_name(template.tenant_id, previous_name, template.id)

    async def delete(self, *, tenant_id: str, template_id: str) -> None:
        """See `TemplateRepository.delete`."""
        doc = await self._own(tenant_id, template_id)
        if doc is None:
            raise NotFound("Template", template_id)
        await self._templates.delete_one({"_id": template_id})
        await self._versions.delete_many({"template_id": template_id})
        await self._release_name(tenant_id, doc["name"], template_id)

    async def page(self, *, tenant_id: str, before_id: str | None, limit: int) -> list[Template]:
        """See `TemplateRepository.page`."""
        query: Document = {"tenant_id": tenant_id}
        if before_id:
            query["_id"] = {"$lt": before_id}
        cursor = self._templates.find(query).sort("_id", DESCENDING).limit(limit)
        return [_template(doc) async for doc in cursor]

    async def publish(self, *, template: Template, now: datetime) -> TemplateVersion:
        """See `TemplateRepository.publish`."""
        number = await self._latest(template.id, template.published_version) + 1
        while True:
            version = TemplateVersion(
                template_id=template.id,
                tenant_id=template.tenant_id,
                version=number,
                subject=template.subject,
                html=template.html,
                text=template.text,
                defaults=template.defaults,
                created_at=now,
            )
            try:
                await self._versions.insert_one(
                    {
                        "_id": _version_id(template.id, number),
                        "template_id": template.id,
                        "tenant_id": template.tenant_id,
                        "version": number,
                        "subject": version.subject,
                        "html": version.html,
                        "text": version.text,
                        "defaults": json.dumps(version.defaults),
                        "created_at": now,
                    }
                )
                break
            except Exception as exc:
                if not is_duplicate_key(exc):
                    raise
                number += 1  # a concurrent publish took this number
        # Only a hint (see the module docstring); readers probe past it.
        await self._templates.update_one(
            {"_id": template.id, "published_version": {"$lt": number}},
            {"$set": {"published_version": number}},
        )
        return version

    async def version(self, *, template: Template, number: int) -> TemplateVersion:
        """See `TemplateRepository.version`."""
        doc = await self._versions.find_one({"_id": _version_id(template.id, number)})
        if doc is None or doc.get("tenant_id") != template.tenant_id:
            raise NotFound("TemplateVersion", f"{template.id}:{number}")
        return _version(doc)

    async def versions(
        self, *, template: Template, below: int | None, limit: int
    ) -> list[TemplateVersion]:
        """See `TemplateRepository.versions`.

        Read by ``_id`` from the newest number down: each is an index lookup on FerretDB too.
        """
        number = template.published_version
        if below is not None:
            number = min(below - 1, number)
        out: list[TemplateVersion] = []
        while number >= 1 and len(out) < limit:
            doc = await self._versions.find_one({"_id": _version_id(template.id, number)})
            if doc is not None:
                out.append(_version(doc))
            number -= 1
        return out


__all__ = [
    "INDEXES",
    "TEMPLATES",
    "TEMPLATE_NAMES",
    "TEMPLATE_VERSIONS",
    "MongoTemplateRepository",
    "Template",
    "TemplateRepository",
    "TemplateVersion",
]
