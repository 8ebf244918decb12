"""Azure SDK exceptions -> qo's storage errors, and keeping credentials out of text.

Only the response's status, error code and the first line of its message (scrubbed of
every known secret) are used, never ``str(exc)`` whole: the SDK's message carries the
response body, and an authentication failure's body quotes the string the server
signed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from qo.backend_kit import SecretScrubber, scrub
from qo import StorageUnavailable, Throttled
from qo.storage import NotFound, PreconditionFailed, StorageError

__all__ = ["map_error", "scrub", "remember_secrets", "is_transport"]

BACKEND = "azure"

#: the service asks the client to slow down (``Throttled``: retried from a longer wait)
_THROTTLED_CODES = {"ServerBusy", "TooManyRequests", "IngressOverAccountLimit", "EgressOverAccountLimit",
                    "AccountRequestRateIsTooHigh"}
#: the service failed this request (``StorageUnavailable``: retried)
_TRANSIENT_CODES = {"OperationTimedOut", "InternalError"}
_PRECONDITION_CODES = {"ConditionNotMet", "BlobAlreadyExists", "TargetConditionNotMet", "SourceConditionNotMet"}
_NO_BLOB = {"BlobNotFound", "ResourceNotFound"}
_HINTS = {
    "ContainerNotFound": "container {container!r} does not exist (qo does not create it)",
    "AuthenticationFailed": "authentication failed: the account key or SAS token does not match the account",
    "AuthorizationFailure": "not authorised on container {container!r}",
    "AuthorizationPermissionMismatch": "the credentials lack permission for this operation on {container!r}",
    "AuthorizationResourceTypeMismatch": "the SAS token does not grant access to this resource type",
    "AuthorizationServiceMismatch": "the SAS token is not valid for the blob service",
    "InsufficientAccountPermissions": "the account lacks permission for this operation",
    "AccountIsDisabled": "the storage account is disabled",
    "InvalidAuthenticationInfo": "the authentication information is malformed",
    "InvalidHeaderValue": "the service refused a header (an emulator older than the SDK's API version?)",
    "UnsupportedHeader": "the service does not support a header this request needs",
    "InvalidQueryParameterValue": "the service refused a query parameter (an emulator without startFrom?)",
    "LeaseIdMissing": "the blob is leased by someone else (qo never leases blobs)",
    "InvalidResourceName": "Azure refuses this blob or container name",
}
_CREDENTIAL_ERRORS = ("ClientAuthenticationError", "CredentialUnavailableError")


#: the SDK logs requests (URLs, headers) at INFO/DEBUG and redacts what it knows to be
#: sensitive; every credential an AzureStorage knows is replaced with ``***`` as well
SCRUBBER = SecretScrubber().install([
    "azure", "azure.core", "azure.core.pipeline.policies.http_logging_policy", "azure.core.pipeline._base",
    "azure.core.pipeline.policies._universal", "azure.core.pipeline.policies._retry",
    "azure.core.pipeline.policies._retry_async", "azure.core.pipeline.transport._aiohttp",
    "azure.core.pipeline.transport._base", "azure.core.exceptions", "azure.core._pipeline_client_async",
    "azure.storage", "azure.storage.blob", "azure.storage.blob._shared.policies",
    "azure.storage.blob._shared.policies_async", "azure.storage.blob._shared.authentication",
    "azure.storage.blob._shared.base_client", "azure.storage.blob._shared.base_client_async",
    "azure.storage.blob._shared.request_handlers", "azure.storage.blob._shared.response_handlers",
    "azure.identity", "azure.identity.aio", "aiohttp.client", "aiohttp.access"])


def remember_secrets(secrets: tuple[str, ...]) -> None:
    """Have the log filter scrub these (strings of at least 4 characters)."""
    SCRUBBER.remember(secrets)


def is_transport(exc: BaseException) -> bool:
    """Connection, timeout and streaming failures: worth retrying."""
    from azure.core.exceptions import IncompleteReadError, ServiceRequestError, ServiceResponseError

    if isinstance(exc, (ServiceRequestError, ServiceResponseError, IncompleteReadError,
                        asyncio.TimeoutError, OSError)):
        return True
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - the SDK's async transport is aiohttp
        return False
    return isinstance(exc, aiohttp.ClientError)


def _code(exc: Any) -> str:
    code = getattr(exc, "error_code", None)
    code = getattr(code, "value", code)  # StorageErrorCode is a str enum
    if not code:
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None) or {}
        code = headers.get("x-ms-error-code") if hasattr(headers, "get") else None
    return str(code or "")


def map_error(
    exc: BaseException, *, key: str | None, op: str = "", container: str = "", secrets: tuple[str, ...] = ()
) -> StorageError:
    """The qo error for an Azure SDK / aiohttp exception: names backend and key, never credentials."""
    if isinstance(exc, StorageError):
        return exc
    where = {"backend": BACKEND, "key": key}
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and status:
        code = _code(exc)
        message = scrub(str(getattr(exc, "reason", "") or ""), secrets, limit=120)
        detail = f"[{code or 'no code'}, HTTP {status}{', ' + op if op else ''}]"
        if status == 412 or code in _PRECONDITION_CODES:
            return PreconditionFailed(f"condition not met {detail}", **where)
        if code in _NO_BLOB or (status == 404 and not code):
            return NotFound(f"no such key {detail}", **where)
        if status in (429, 503) or code in _THROTTLED_CODES:
            return Throttled(f"throttled or busy: {message or code} {detail}", **where)
        if status >= 500 or status == 408 or code in _TRANSIENT_CODES:
            return StorageUnavailable(f"server error: {message or code} {detail}", **where)
        hint = _HINTS.get(code, "").format(container=container)
        return StorageError(f"{hint or message or 'request failed'} {detail}", **where)
    name = type(exc).__name__
    if name in _CREDENTIAL_ERRORS:
        return StorageError(f"no usable Azure credentials ({name}): set AZURE_STORAGE_CONNECTION_STRING, "
                            "or AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY or "
                            "AZURE_STORAGE_SAS_TOKEN", **where)
    if is_transport(exc):
        return StorageUnavailable(f"cannot reach the Azure endpoint ({name})", **where)
    return StorageError(f"Azure client error ({name})", **where)
