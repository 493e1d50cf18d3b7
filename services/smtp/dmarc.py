"""DMARC record builder (RFC 7489): policy tags, report URIs and external report authorisation.

Builds ``_dmarc.<domain>`` from the caller's choices and validates every tag. Report URIs must
be ``mailto:`` URIs (the only scheme receivers are required to support), optionally with a
size limit (``!10m``). When a report address lives under another organisational domain, that
domain must publish ``<domain>._report._dmarc.<report domain> TXT "v=DMARC1"`` (RFC 7489 §7.1)
or receivers will not send it reports; the builder returns those records. Organisational
domains come from the Public Suffix List bundled with ``publicsuffixlist`` (no network).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from publicsuffixlist import PublicSuffixList

from services.core.dns_names import normalize_domain_name, split_txt
from services.core.errors import FieldViolation, InvalidArgument
from services.smtp.models import DmarcInput, DmarcPolicy, DmarcRecord, ExternalAuthorization

_LOCAL_PART_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._%+=-]{0,62}[A-Za-z0-9_%+=-])?$")
_SIZE_RE = re.compile(r"^[0-9]{1,10}[kmgt]?$", re.IGNORECASE)
_FAILURE_OPTIONS = ("0", "1", "d", "s")
_MIN_USEFUL_INTERVAL = 3600


def check_report_uri(raw: str, *, field: str) -> tuple[str, str]:
    """Validate one report URI and return it canonically with its address's domain.

    Raises:
        InvalidArgument: on `field`.
    """
    text = raw.strip()
    scheme, colon, rest = text.partition(":")
    if not colon or scheme.lower() != "mailto":
        hint = f" (write mailto:{text})" if "@" in text and not colon else ""
        raise InvalidArgument.single(field, f"must be a mailto: URI{hint}; got {text[:60]!r}")
    address, bang, size = rest.partition("!")
    if bang and not _SIZE_RE.match(size):
        raise InvalidArgument.single(
            field, f"the size limit after ! must be a number with k, m, g or t; got {size!r}"
        )
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise InvalidArgument.single(field, f"{address[:60]!r} is not an e-mail address")
    if not _LOCAL_PART_RE.match(local) or ".." in local:
        raise InvalidArgument.single(
            field,
            f"the local part {local[:40]!r} may contain letters, digits and . _ % + = - only "
            "(commas and semicolons separate DMARC values)",
        )
    a_label, _ = normalize_domain_name(domain, field=field)
    canonical = f"mailto:{local}@{a_label}" + (f"!{size.lower()}" if bang else "")
    return canonical, a_label


class DmarcBuilder:
    """Builds DMARC records."""

    def __init__(self, suffixes: PublicSuffixList) -> None:
        self._suffixes = suffixes

    def organizational_domain(self, name: str) -> str:
        """The registrable domain of `name` (itself when the list does not know it)."""
        return self._suffixes.privatesuffix(name) or name

    def build(self, *, domain: str, request: DmarcInput) -> DmarcRecord:
        """Build ``_dmarc.<domain>``.

        Raises:
            InvalidArgument: on ``policy``, ``percent``, ``aggregate_report_uris[i]``,
                ``failure_report_uris[i]``, ``failure_options`` or ``report_interval``.
        """
        violations: list[FieldViolation] = []
        warnings: list[str] = []
        if request.policy is None:
            violations.append(FieldViolation("policy", "required: none, quarantine or reject"))
        if request.percent is not None and request.percent > 100:
            violations.append(FieldViolation("percent", f"must be 0-100; got {request.percent}"))
        rua, rua_domains = self._uris(
            request.aggregate_report_uris, "aggregate_report_uris", violations
        )
        ruf, ruf_domains = self._uris(
            request.failure_report_uris, "failure_report_uris", violations
        )
        fo = self._failure_options(request.failure_options, violations)
        if request.report_interval is not None:
            if request.report_interval == 0:
                violations.append(FieldViolation("report_interval", "must be at least 1 second"))
            elif request.report_interval < _MIN_USEFUL_INTERVAL:
                warnings.append(
                    "receivers are only expected to send reports daily or hourly; an interval "
                    "below 3600 seconds will not be honoured"
                )
        if violations:
            raise InvalidArgument(violations)
        assert request.policy is not None  # checked above

        tags = [("v", "DMARC1"), ("p", request.policy.value)]
        if request.subdomain_policy is not None:
            tags.append(("sp", request.subdomain_policy.value))
        if request.percent is not None:
            tags.append(("pct", str(request.percent)))
        if request.dkim_alignment is not None:
            tags.append(("adkim", request.dkim_alignment.value))
        if request.spf_alignment is not None:
            tags.append(("aspf", request.spf_alignment.value))
        if rua:
            tags.append(("rua", ",".join(rua)))
        if ruf:
            tags.append(("ruf", ",".join(ruf)))
        if fo:
            tags.append(("fo", fo))
        if request.report_interval is not None:
            tags.append(("ri", str(request.report_interval)))
        value = "; ".join(f"{k}={v}" for k, v in tags)

        if not rua:
            warnings.append("without aggregate_report_uris (rua) you receive no reports")
        if len(rua) > 2 or len(ruf) > 2:
            warnings.append("some receivers send reports to the first two addresses only")
        if fo and not ruf:
            warnings.append("failure_options (fo) only matter with failure_report_uris (ruf)")
        if request.percent is not None or request.report_interval is not None:
            warnings.append(
                "pct and ri come from RFC 7489; RFC 9989 (DMARCbis) removed them, so receivers "
                "that follow it ignore them"
            )
        if request.policy is DmarcPolicy.NONE and request.percent not in (None, 100):
            warnings.append("percent (pct) has no effect with policy none")

        own = self.organizational_domain(domain)
        authorizations: list[ExternalAuthorization] = []
        for report_domain in dict.fromkeys([*rua_domains, *ruf_domains]):
            if self.organizational_domain(report_domain) != own:
                authorizations.append(
                    ExternalAuthorization(
                        record_name=f"{domain}._report._dmarc.{report_domain}",
                        value="v=DMARC1",
                        report_domain=report_domain,
                    )
                )
        return DmarcRecord(
            record_name=f"_dmarc.{domain}",
            value=value,
            strings=split_txt(value),
            external_authorizations=tuple(authorizations),
            warnings=tuple(warnings),
        )

    @staticmethod
    def _uris(
        uris: Sequence[str], field: str, violations: list[FieldViolation]
    ) -> tuple[list[str], list[str]]:
        canonical: list[str] = []
        domains: list[str] = []
        for index, raw in enumerate(uris):
            try:
                uri, report_domain = check_report_uri(raw, field=f"{field}[{index}]")
            except InvalidArgument as exc:
                violations.extend(exc.violations)
                continue
            if uri in canonical:
                violations.append(FieldViolation(f"{field}[{index}]", f"{uri} is listed twice"))
                continue
            canonical.append(uri)
            domains.append(report_domain)
        return canonical, domains

    @staticmethod
    def _failure_options(raw: str, violations: list[FieldViolation]) -> str:
        text = raw.strip().lower()
        if not text:
            return ""
        options = [o.strip() for o in text.split(":")]
        for option in options:
            if option not in _FAILURE_OPTIONS:
                violations.append(
                    FieldViolation(
                        "failure_options",
                        f"options are 0, 1, d and s separated by colons; got {option!r}",
                    )
                )
                return ""
        if len(set(options)) != len(options):
            violations.append(FieldViolation("failure_options", "an option is repeated"))
            return ""
        return ":".join(options)


__all__ = ["DmarcBuilder", "check_report_uri"]
