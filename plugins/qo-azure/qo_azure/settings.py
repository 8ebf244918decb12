"""``az://`` URLs and where the credentials come from.

URL: ``az://container[/prefix][?account=NAME&endpoint_url=URL]``. The URL never carries
a secret: userinfo and unknown query parameters are refused.

Credentials, most specific first:

1. constructor options: ``connection_string``; or ``account_key`` / ``sas_token`` /
   ``credential`` (an async token credential) with the account;
2. ``AZURE_STORAGE_CONNECTION_STRING``;
3. the account (option ``account_name``, URL ``account=``, ``AZURE_STORAGE_ACCOUNT_NAME``
   or ``AZURE_STORAGE_ACCOUNT``) with ``AZURE_STORAGE_ACCOUNT_KEY`` (or
   ``AZURE_STORAGE_KEY``), else ``AZURE_STORAGE_SAS_TOKEN``;
4. the account alone: ``azure.identity.aio.DefaultAzureCredential`` when azure-identity
   is installed (``pip install 'qo-azure[identity]'``).

The endpoint is ``endpoint_url`` (option or URL), else the connection string's
``BlobEndpoint`` (or its protocol, account and suffix), else
``https://ACCOUNT.blob.core.windows.net``.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import attrs

from qo.backend_kit import split_bucket_url
from qo import ConfigurationError, InvalidInput

__all__ = ["AzureSettings", "parse_url", "resolve", "parse_connection_string", "check_blob_name", "DEVSTORE_KEY"]

#: 3-63 of a-z 0-9 and single hyphens, starting and ending with a letter or digit
_CONTAINER = re.compile(r"^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]\Z")
_ACCOUNT = re.compile(r"^[a-z0-9]{3,24}\Z")
_QUERY = {"account": "account_name", "account_name": "account_name", "endpoint_url": "endpoint_url",
          "endpoint": "endpoint_url"}
OPTIONS = ("account_name", "endpoint_url", "connection_string", "account_key", "sas_token", "credential",
           "connect_timeout", "read_timeout")
_ENV_ACCOUNT = ("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT")
_ENV_KEY = ("AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_KEY")
_NO_CREDENTIALS = (
    "no Azure credentials: set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME with "
    "AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN, or install azure-identity "
    "(pip install 'qo-azure[identity]'; from a checkout: pip install './plugins/qo-azure[identity]') for DefaultAzureCredential"
)
#: Azurite's published development account key (UseDevelopmentStorage=true); not a secret
DEVSTORE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@attrs.frozen
class AzureSettings:
    """Where the container is and how to authenticate. Secrets stay out of the repr."""

    container: str
    prefix: str
    account_name: str | None
    endpoint: str  #: the blob service URL, e.g. https://acct.blob.core.windows.net
    auth: str  #: "account key", "sas token", "token credential", "default credential"
    account_key: str | None = attrs.field(default=None, repr=False)
    sas_token: str | None = attrs.field(default=None, repr=False)
    credential: Any = attrs.field(default=None, repr=False)
    timeouts: tuple[float, float] = (10.0, 30.0)

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every string that must never appear in an error, a repr or a log."""
        out = [s for s in (self.account_key, self.sas_token) if s]
        if self.sas_token:  # the signature alone, as it appears inside URLs
            out += [v for k, v in parse_qsl(self.sas_token.lstrip("?")) if k == "sig" and v]
        return tuple(s for s in dict.fromkeys(out) if len(s) >= 4)


def check_blob_name(name: str, *, field: str = "key") -> str:
    """Refuse what Azure cannot store faithfully (beyond ``qo.storage.validate_key``).

    Azure's naming rules: no path segment may end with a dot (the service trims it, so
    ``a.`` would become ``a``), and control characters are not allowed in names.
    """
    for part in name.split("/"):
        if part.endswith("."):
            raise InvalidInput(field, f"Azure cannot store a path segment ending in '.': {part[:60]!r}")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in name):
        raise InvalidInput(field, "Azure does not allow control characters in blob names")
    return name


def parse_url(url: str) -> tuple[str, str, dict[str, str]]:
    """Split ``az://container/prefix?query`` into (container, prefix, settings); raise InvalidInput."""
    container, prefix, settings = split_bucket_url(
        url, "az", query=_QUERY, credentials_hint="use AZURE_STORAGE_CONNECTION_STRING etc.")
    if not _CONTAINER.match(container):
        raise InvalidInput("url", f"invalid container name {container[:70]!r} (3-63 of a-z 0-9 and single '-')")
    if prefix:
        check_blob_name(prefix, field="url")
    return container, prefix, settings


def parse_connection_string(text: str) -> dict[str, str]:
    """``Name=value;...`` with names lower-cased; raise ConfigurationError (never echoing it)."""
    fields: dict[str, str] = {}
    for part in text.strip().strip(";").split(";"):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise ConfigurationError("the Azure connection string is malformed (expected Name=value;...)")
        fields[name.strip().lower()] = value.strip()
    if fields.get("usedevelopmentstorage", "").lower() == "true":
        fields.setdefault("accountname", "devstoreaccount1")
        fields.setdefault("accountkey", DEVSTORE_KEY)
        fields.setdefault("blobendpoint", "http://127.0.0.1:10000/devstoreaccount1")
    return fields


def _check_endpoint(endpoint: str) -> str:
    try:
        parts = urlsplit(endpoint)
    except ValueError:
        raise InvalidInput("url", "endpoint_url is malformed") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput("url", "endpoint_url must be an http:// or https:// URL")
    if parts.username or parts.password or parts.query:
        raise InvalidInput("url", "endpoint_url must not carry credentials or a query (SAS: AZURE_STORAGE_SAS_TOKEN)")
    return endpoint.rstrip("/")


def _seconds(value: Any, name: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds > 0:
        raise InvalidInput("options", f"{name} must be a positive number of seconds")
    return seconds


def _env(names: tuple[str, ...]) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def resolve(url: str, options: dict[str, Any]) -> AzureSettings:
    """The settings for ``url`` and ``options`` (see the module docstring for the order)."""
    container, prefix, query = parse_url(url)
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise InvalidInput("options", f"unknown Azure options: {', '.join(sorted(unknown))[:200]}")
    opts = {k: v for k, v in options.items() if v is not None}
    timeouts = (_seconds(opts.get("connect_timeout", 10.0), "connect_timeout"),
                _seconds(opts.get("read_timeout", 30.0), "read_timeout"))
    account = opts.get("account_name") or query.get("account_name")
    endpoint = opts.get("endpoint_url") or query.get("endpoint_url")
    endpoint = _check_endpoint(str(endpoint)) if endpoint else None
    base = dict(container=container, prefix=prefix, timeouts=timeouts)

    explicit = any(k in opts for k in ("account_key", "sas_token", "credential"))
    text = opts.get("connection_string") or (None if explicit else os.environ.get("AZURE_STORAGE_CONNECTION_STRING"))
    if text:
        fields = parse_connection_string(str(text))
        cs_account = fields.get("accountname")
        if account and cs_account and account != cs_account:
            raise ConfigurationError(
                f"the URL names account {account!r} but the connection string is for {cs_account!r}")
        account = account or cs_account
        if not endpoint:
            endpoint = fields.get("blobendpoint")
            if not endpoint and account:
                protocol = fields.get("defaultendpointsprotocol", "https")
                suffix = fields.get("endpointsuffix", "core.windows.net")
                endpoint = f"{protocol}://{account}.blob.{suffix}"
            if not endpoint:
                raise ConfigurationError("the Azure connection string names neither BlobEndpoint nor AccountName")
            endpoint = _check_endpoint(endpoint)
        key, sas = fields.get("accountkey"), fields.get("sharedaccesssignature")
        if key and account:
            return AzureSettings(**base, account_name=account, endpoint=endpoint, auth="account key", account_key=key)
        if sas:
            return AzureSettings(**base, account_name=account, endpoint=endpoint, auth="sas token", sas_token=sas)
        raise ConfigurationError("the Azure connection string has neither AccountName+AccountKey nor a "
                                 "SharedAccessSignature")

    account = account or _env(_ENV_ACCOUNT)
    if not account:
        raise ConfigurationError(_NO_CREDENTIALS)
    if not _ACCOUNT.match(account):
        raise InvalidInput("url", f"invalid storage account name {account[:40]!r} (3-24 of a-z 0-9)")
    endpoint = endpoint or f"https://{account}.blob.core.windows.net"
    base.update(account_name=account, endpoint=endpoint)
    if opts.get("credential") is not None:
        return AzureSettings(**base, auth="token credential", credential=opts["credential"])
    key = opts.get("account_key") or (None if explicit else _env(_ENV_KEY))
    if key:
        return AzureSettings(**base, auth="account key", account_key=str(key))
    sas = opts.get("sas_token") or (None if explicit else os.environ.get("AZURE_STORAGE_SAS_TOKEN"))
    if sas:
        return AzureSettings(**base, auth="sas token", sas_token=str(sas).lstrip("?"))
    try:
        import azure.identity.aio  # noqa: F401
    except ImportError:
        raise ConfigurationError(_NO_CREDENTIALS) from None
    return AzureSettings(**base, auth="default credential")
