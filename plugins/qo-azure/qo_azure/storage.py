"""Azure Blob Storage: the qo contract on Put Blob's conditional headers, via azure-storage-blob.

- create-only is Put Blob with ``If-None-Match: *``; compare-and-swap is Put Blob with
  ``If-Match: <etag>``; a conditional delete is Delete Blob with ``If-Match``.
- ``list`` is List Blobs (up to 5000 names a page) with ``startFrom`` for
  ``start_after``, corrected to UTF-8 order where the server's differs (``listing``).
- ``delete_many`` is the blob batch API (256 deletes per request), falling back to
  concurrent single deletes where a batch, or the deletes inside it, are refused.
- The SDK's retries are off (``retry_total=0``): the engine retries ``StorageUnavailable``.

URL: ``az://container[/prefix][?account=...&endpoint_url=...]``; credentials: see
:mod:`qo_azure.settings`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from azure.core import MatchConditions
from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential
from azure.core.pipeline.transport import AioHttpTransport
from azure.storage.blob.aio import ContainerClient

from qo.backend_kit import ServerClock
from qo import InvalidInput, StorageUnavailable
from qo.storage import (
    Blob,
    Entry,
    NotFound,
    PreconditionFailed,
    StorageError,
    check_put,
    validate_key,
    validate_prefix,
)

from . import listing
from .errors import BACKEND, map_error, remember_secrets
from .settings import AzureSettings, check_blob_name, resolve

__all__ = ["AzureStorage", "check_blob_name"]

BATCH_MAX = 256  #: deletes per blob batch request (the service's limit)
#: statuses of a batch, or of a delete inside one, that mean "not done this way": a
#: single Delete Blob is tried instead (and says what is wrong if it fails too)
_REFUSED = (400, 403, 405, 501)
_SENT = "qo_azure_sent"  # pipeline context key: when the request left


def _etag(value: Any) -> str:
    """Etags quoted as Put Blob returns them (List Blobs gives them bare)."""
    text = str(value or "")
    return text if text.startswith('"') else f'"{text}"'


class AzureStorage:
    """Storage in an Azure blob container under an optional prefix; keys are relative to it.

    ``clock_offset`` (seconds, server minus local) is estimated from every response's
    ``Date`` header (:class:`qo.backend_kit.ServerClock`). ``http_requests`` counts
    the HTTP responses received, so a benchmark can check the engine's call counts.
    """

    name = BACKEND
    page_size = 5000  #: names per List Blobs request (Azure's maximum); tests lower it

    def __init__(self, url: str, **options: Any):
        self.settings: AzureSettings = resolve(url, options)
        self.container = self.settings.container
        self.prefix = self.settings.prefix
        self._secrets = self.settings.secrets
        remember_secrets(self._secrets)
        self._root = self.prefix + "/" if self.prefix else ""
        self._clock = ServerClock()
        self.http_requests = 0
        self._batch_ok = True
        self._client: Any = None
        self._session: Any = None
        self._credential: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        s = self.settings
        return (f"AzureStorage(container={s.container!r}, prefix={s.prefix!r}, account={s.account_name!r}, "
                f"endpoint={s.endpoint!r}, auth={s.auth!r})")

    @property
    def clock_offset(self) -> float:
        return self._clock.offset

    # -- the client ------------------------------------------------------------

    def _on_request(self, request: Any) -> None:
        request.context[_SENT] = time.time()

    def _on_response(self, response: Any) -> None:
        """Every HTTP response (errors included): count it and read the server clock."""
        self.http_requests += 1
        t1 = time.time()
        t0 = response.context.get(_SENT, t1) if hasattr(response, "context") else t1
        headers = getattr(response.http_response, "headers", None) or {}
        self._clock.observe(headers.get("Date"), t0, t1)

    def _container_client(self) -> Any:
        """The SDK's async ContainerClient for the running loop, created on first use."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first use, or a new event loop (e.g. asyncio.run per command)
            self._abandon()
            self._loop = loop
        if self._client is None:
            s = self.settings
            if s.auth == "account key":
                credential: Any = AzureNamedKeyCredential(s.account_name or "", s.account_key or "")
            elif s.auth == "sas token":
                credential = AzureSasCredential(s.sas_token or "")
            elif s.auth == "token credential":
                credential = s.credential
            else:
                from azure.identity.aio import DefaultAzureCredential

                credential = self._credential = DefaultAzureCredential()
            # our own session, so that a client left on a finished loop can be released
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64), cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False, trust_env=True)
            transport = AioHttpTransport(session=self._session, session_owner=False,
                                         connection_timeout=s.timeouts[0], read_timeout=s.timeouts[1])
            self._client = ContainerClient(
                s.endpoint, s.container, credential=credential, transport=transport,
                retry_total=0,  # one attempt: the engine retries StorageUnavailable
                max_single_put_size=256 * 1024 * 1024,  # one Put Blob, no staged blocks
                max_single_get_size=256 * 1024 * 1024,  # one Get Blob for any qo object
                raw_request_hook=self._on_request, raw_response_hook=self._on_response,
            )
        return self._client

    def _abandon(self) -> None:
        """Forget a client made on another (finished) event loop, releasing its sockets.

        aiohttp cannot close a session from another loop; closing its connector's
        sockets (best effort, private API) avoids "Unclosed client session".
        """
        session, self._session, self._client, self._credential = self._session, None, None, None
        connector = getattr(session, "connector", None)
        close = getattr(connector, "_close", None)
        if close is not None:
            close()

    async def close(self) -> None:
        """Close the HTTP session; the storage reconnects if used again."""
        if self._loop is not asyncio.get_running_loop():
            self._abandon()
            return
        client, session, credential = self._client, self._session, self._credential
        self._client = self._session = self._credential = None
        for closing in (client, credential, session):
            if closing is not None:
                try:
                    await closing.close()
                except Exception:  # closing is best effort
                    pass

    # -- plumbing --------------------------------------------------------------

    def _name(self, key: str) -> str:
        return self._root + check_blob_name(validate_key(key))

    def _error(self, exc: BaseException, key: str | None, *, op: str = "") -> StorageError:
        return map_error(exc, key=key, op=op, container=self.container, secrets=self._secrets)

    # -- the contract -------------------------------------------------------------

    async def get(self, key: str) -> Blob:
        """The object's bytes and etag; ``NotFound`` if the key does not exist."""
        name = self._name(key)
        try:
            downloader = await self._container_client().get_blob_client(name).download_blob(max_concurrency=1)
            data = await downloader.readall()
        except Exception as exc:
            error = self._error(exc, key, op="get_blob")
            if isinstance(error, PreconditionFailed):  # a write landed between two ranges of one read
                error = StorageUnavailable("the object changed while being read", backend=self.name, key=key)
            raise error from None
        return Blob(bytes(data), _etag(downloader.properties.etag))

    async def put(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        """Write the object (create-only or CAS if asked); return the new ETag."""
        name = self._name(key)
        data = check_put(data, if_match, if_none_match)
        conditions: dict[str, Any] = {}
        if if_none_match:
            conditions["match_condition"] = MatchConditions.IfMissing
        elif if_match is not None:
            conditions.update(match_condition=MatchConditions.IfNotModified, etag=if_match)
        blob = self._container_client().get_blob_client(name)
        try:
            resp = await blob.upload_blob(data, overwrite=True, max_concurrency=1, **conditions)
        except Exception as exc:
            error = self._error(exc, key, op="put_blob")
            if isinstance(error, NotFound) and if_match is not None:
                error = PreconditionFailed("key does not exist", backend=self.name, key=key)
            raise error from None
        return _etag(resp["etag"])

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Delete the key (only at ``if_match`` if given); a missing key is not an error."""
        name = self._name(key)
        conditions: dict[str, Any] = {}
        if if_match is not None:
            conditions.update(match_condition=MatchConditions.IfNotModified, etag=if_match)
        blob = self._container_client().get_blob_client(name)
        try:
            await blob.delete_blob(**conditions)
        except Exception as exc:
            error = self._error(exc, key, op="delete_blob")
            if isinstance(error, NotFound):
                return
            if isinstance(error, PreconditionFailed) and await self._missing(blob, key):
                return  # Azure answers 412, not 404, to If-Match on a missing blob
            raise error from None

    async def _missing(self, blob: Any, key: str) -> bool:
        try:
            await blob.get_blob_properties()
        except Exception as exc:
            if isinstance(self._error(exc, key, op="get_blob_properties"), NotFound):
                return True
            raise self._error(exc, key, op="get_blob_properties") from None
        return False

    async def delete_many(self, keys: list[str]) -> None:
        """Delete up to 1000 keys: one blob batch request per 256, sent concurrently;
        missing keys are fine. Where the service refuses batches (the request, or each
        delete inside it), deletes one by one (``_delete_batch``)."""
        keys = list(keys)
        if len(keys) > 1000:
            raise InvalidInput("keys", "at most 1000 keys per delete_many call")
        names = [self._name(k) for k in keys]
        if not names:
            return
        chunks = [keys[i : i + BATCH_MAX] for i in range(0, len(keys), BATCH_MAX)]
        await asyncio.gather(*(self._delete_batch(chunk) for chunk in chunks))

    async def _delete_batch(self, keys: list[str]) -> None:
        """Delete ``keys`` (at most ``BATCH_MAX``) in one blob batch request.

        A service may refuse the whole batch (e.g. a SAS without batch rights) or accept
        the batch but refuse every delete inside it (Azurite 3.35.0 answers 400
        InvalidInput to each sub-request): either way the refused keys are deleted one by
        one, and where no delete went through, ``_batch_ok`` remembers that batches do
        not work here, so later calls go straight to single deletes. A sub-response 404
        is a key that was already gone: fine.
        """
        if not self._batch_ok:
            await self._delete_singly(keys)
            return
        client = self._container_client()
        try:
            responses = await client.delete_blobs(*(self._name(k) for k in keys), raise_on_any_failure=False)
            results = [r async for r in responses] if hasattr(responses, "__aiter__") else list(responses)
        except Exception as exc:
            error = self._error(exc, None, op="blob_batch")
            if type(error) is StorageError and getattr(exc, "status_code", 0) in _REFUSED:
                self._batch_ok = False  # e.g. a SAS or an emulator without batches: one by one
                await self._delete_singly(keys)
                return
            raise error from None
        refused: list[str] = []
        accepted = False
        for key, response in zip(keys, results):
            status = getattr(response, "status_code", 0)
            if status in (200, 202, 204, 404):
                accepted = True
            elif status in _REFUSED:
                refused.append(key)
            else:
                raise self._error(_SubResponseError(response), key, op="blob_batch")
        refused += keys[len(results):]  # a sub-response the batch did not carry: delete it ourselves
        if refused and not accepted:
            self._batch_ok = False  # not one delete inside a batch went through: batches do not work here
        await self._delete_singly(refused)

    async def _delete_singly(self, keys: list[str]) -> None:
        """One Delete Blob per key, concurrently (a missing key is fine)."""
        await asyncio.gather(*(self.delete(k) for k in keys))

    async def list(self, prefix: str, *, start_after: str | None = None, limit: int = 1000) -> list[Entry]:
        """Keys starting with ``prefix`` after ``start_after``, in UTF-8 byte order, at most ``limit``."""
        validate_prefix(prefix)
        if start_after is not None and not isinstance(start_after, str):
            raise InvalidInput("start_after", "must be a string")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise InvalidInput("limit", "must be an integer >= 0")
        if limit == 0:
            return []
        cut = len(self._root)
        after = listing.utf8_key(start_after) if start_after else None
        kwargs: dict[str, Any] = {"name_starts_with": self._root + prefix}
        if start_after:
            start = listing.start_from(self._root + start_after)
            if start > kwargs["name_starts_with"]:
                kwargs["start_from"] = start
        found: dict[str, Entry] = {}
        chosen: list[str] = []
        token: str | None = None
        while True:
            last: str | None = None
            want = limit - len(chosen) if len(chosen) < limit else limit
            # a continuation marker says where to go on: startFrom only starts a listing
            where = kwargs if token is None else {"name_starts_with": kwargs["name_starts_with"]}
            try:
                pages = self._container_client().list_blobs(
                    results_per_page=min(self.page_size, want + (1 if start_after else 0)), **where
                ).by_page(continuation_token=token)
                page = await pages.__anext__()
                async for item in page:
                    key = last = item.name[cut:]
                    if after is not None and listing.utf8_key(key) <= after:
                        continue
                    modified = item.last_modified
                    found[key] = Entry(key, _etag(item.etag), int(item.size or 0),
                                       modified.timestamp() if modified is not None else None)
                token = pages.continuation_token
            except StopAsyncIteration:
                token = None
            except Exception as exc:
                raise self._error(exc, prefix or None, op="list_blobs") from None
            chosen = listing.smallest(found, limit)
            if listing.complete(chosen, limit, last, exhausted=not token):
                return [found[k] for k in chosen]


class _SubResponseError(Exception):
    """One failed delete inside a blob batch, shaped for ``map_error``."""

    def __init__(self, response: Any):
        super().__init__("blob batch sub-request failed")
        self.status_code = int(getattr(response, "status_code", 0) or 0)
        self.reason = getattr(response, "reason", "")
        self.response = response
        headers = getattr(response, "headers", None) or {}
        self.error_code = headers.get("x-ms-error-code") if hasattr(headers, "get") else None
