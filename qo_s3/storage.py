"""S3 storage: the qo contract on PutObject's conditional writes, via s3fs/aiobotocore.

- create-only is ``PutObject(IfNoneMatch="*")``; compare-and-swap is ``PutObject(IfMatch=etag)``.
- The aiobotocore client comes from ``s3fs.S3FileSystem.set_session()`` (credentials,
  region and endpoint resolution as s3fs users know them); the calls go straight to the
  client because s3fs's high-level API has no conditional writes.
- botocore retries are off (``total_max_attempts=1``, which wins over ``AWS_MAX_ATTEMPTS``
  and profiles' ``max_attempts``): the engine retries ``StorageUnavailable``, not the
  plugin, so qo's backoff is never multiplied by botocore's. A throttle (``SlowDown``,
  429, 503) is ``Throttled``, retried from a longer wait; and from then on the requests
  to that prefix (``{queue}/{kind}/``) are paced to about what S3 accepted there
  (:class:`qo.backend_kit.Pacer`), so one process does not keep bursting into it.

- Stores differ in how they answer conditional requests (Ceph RGW, LocalStack): the
  backend learns the store's dialect (:mod:`qo_s3.dialect`) by a probe on first use,
  keeps it in ``_qo/dialect.json`` under the prefix so each process pays one GET, and
  declares it (``dialect``, ``conditional_delete``). A store whose conditions are not
  enforced is refused then (:class:`~qo_s3.dialect.UnsafeStore`), unless ``unsafe=1``.
- A 5xx or 409 answer to a conditional write is an unknown outcome (it may have landed):
  ``StorageUnavailable``, so the engine re-reads.

URL: ``s3://bucket[/prefix][?endpoint_url=...&region=...&profile=...&addressing_style=...
&dialect=probe|aws|rgw|localstack|if_match:unquoted,...&unsafe=1]``.
Settings, most specific first: constructor options, URL query, ``QO_S3_*`` environment,
then botocore's own chain (``AWS_*`` variables, profiles, instance roles).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from typing import Any
from urllib.parse import urlsplit

import attrs

from qo.backend_kit import Pacer, SecretScrubber, ServerClock, scrub, split_bucket_url
from qo.errors import ConfigurationError, InvalidInput, StorageUnavailable, Throttled
from qo_s3.dialect import DIALECT_KEY, RESERVED, Dialect, UnsafeStore, parse_dialect
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

__all__ = ["S3Storage", "parse_url", "map_error", "UnsafeStore"]

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]\Z")
_ALIASES = {  # accepted spelling -> setting
    "endpoint_url": "endpoint_url",
    "endpoint": "endpoint_url",
    "region": "region",
    "region_name": "region",
    "profile": "profile",
    "addressing_style": "addressing_style",
    "dialect": "dialect",
    "unsafe": "unsafe",
}
_OPTION_ONLY = {"key", "secret", "token", "connect_timeout", "read_timeout"}  # never in a URL
_ENV = {
    "endpoint_url": "QO_S3_ENDPOINT_URL",
    "region": "QO_S3_REGION",
    "key": "QO_S3_ACCESS_KEY_ID",
    "secret": "QO_S3_SECRET_ACCESS_KEY",
    "token": "QO_S3_SESSION_TOKEN",
    "profile": "QO_S3_PROFILE",
}


#: botocore logs whole requests at DEBUG (headers with the session token, the canonical
#: request): every credential an S3Storage knows is replaced with ``***`` there
_SCRUBBER = SecretScrubber().install([
    "botocore", "botocore.auth", "botocore.endpoint", "botocore.hooks", "botocore.httpsession",
    "botocore.parsers", "botocore.credentials", "botocore.retryhandler", "botocore.utils",
    "botocore.client", "aiobotocore", "aiobotocore.endpoint", "aiobotocore.credentials", "s3fs"])


def parse_url(url: str) -> tuple[str, str, dict[str, str]]:
    """Split ``s3://bucket/prefix?query`` into (bucket, prefix, settings); raise InvalidInput."""
    bucket, prefix, settings = split_bucket_url(url, "s3", query=_ALIASES,
                                                credentials_hint="use QO_S3_ACCESS_KEY_ID etc.")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise InvalidInput("url", f"invalid bucket name {bucket!r} (3-63 of a-z 0-9 . - _)")
    return bucket, prefix, settings


# -- error mapping -------------------------------------------------------------

_THROTTLED = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
    "RequestThrottled", "RequestThrottledException", "BandwidthLimitExceeded",
}
_TRANSIENT = {
    "InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeoutException", "OperationAborted",
}
_NO_KEY = {"NoSuchKey", "NotFound", "404"}
_HINTS = {
    "NoSuchBucket": "bucket {bucket!r} does not exist",
    "AccessDenied": "access denied: the credentials lack permission on bucket {bucket!r}",
    "AllAccessDisabled": "all access to bucket {bucket!r} is disabled",
    "InvalidAccessKeyId": "the access key id is not known to this S3 endpoint",
    "SignatureDoesNotMatch": "the secret access key does not match the access key id",
    "ExpiredToken": "the session token has expired",
    "InvalidToken": "the session token is malformed or invalid",
    "RequestTimeTooSkewed": "the local clock is too far from the server's: synchronise it (NTP)",
    "AuthorizationHeaderMalformed": "wrong region for bucket {bucket!r}: set region= in the URL",
    "PermanentRedirect": "bucket {bucket!r} is in another region: set region= in the URL",
    "NotImplemented": "the store does not implement this request (are conditional writes supported?)",
}
_CREDENTIALS_ERRORS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError")


def map_error(
    exc: BaseException, *, key: str | None, op: str = "", bucket: str = "", secrets: tuple[str, ...] = (),
    endpoint: str = "", conditional: bool = False,
) -> StorageError:
    """The qo error for a botocore/aiohttp exception: names backend and key, never credentials.

    ``conditional``: the request carried If-Match / If-None-Match, so a 5xx or 409 is
    an unknown outcome (``StorageUnavailable``), never an answer.

    Only the response's error code and message are used (scrubbed of ``secrets``), never
    ``str(exc)``, which may echo request details.
    """
    if isinstance(exc, StorageError):
        return exc
    where = {"backend": "s3", "key": key}
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        error = response.get("Error") or {}
        code = str(error.get("Code") or "")
        status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
        message = scrub(str(error.get("Message") or ""), secrets)
        detail = f"[{code or 'no code'}, HTTP {status}{', ' + op if op else ''}]"
        if code == "PreconditionFailed" or status == 412:
            return PreconditionFailed(f"condition not met {detail}", **where)
        if code in _NO_KEY or (status == 404 and not code):
            return NotFound(f"no such key {detail}", **where)
        if code in _THROTTLED or status in (429, 503):
            return Throttled(f"throttled: {message or 'slow down'} {detail}", **where)
        if code == "ConditionalRequestConflict" or (
                conditional and (status >= 500 or status == 409) and code != "NotImplemented"):
            # RGW answers a lost CAS race 500 (ECANCELED), AWS a concurrent one 409: the
            # write may or may not have landed, so the engine must re-read
            return StorageUnavailable(f"unknown outcome of a conditional write {detail}", **where)
        if code in _TRANSIENT or (status >= 500 and code != "NotImplemented"):
            return StorageUnavailable(f"server error: {message or code} {detail}", **where)
        hint = _HINTS.get(code, "").format(bucket=bucket)
        return StorageError(f"{hint or message or 'request failed'} {detail}", **where)
    name = type(exc).__name__
    if name in _CREDENTIALS_ERRORS:
        return StorageError(
            f"no usable S3 credentials ({name}): set QO_S3_ACCESS_KEY_ID and QO_S3_SECRET_ACCESS_KEY, "
            "the AWS_* variables, or a profile", **where,
        )
    if name == "ProfileNotFound":
        return StorageError("the configured AWS profile does not exist", **where)
    if _is_transport(exc):
        return StorageUnavailable(f"cannot reach the S3 endpoint {endpoint or '(AWS)'} ({name}): is it up, "
                                  "and is the URL's endpoint_url right?", **where)
    return StorageError(f"S3 client error ({name})", **where)


def _is_transport(exc: BaseException) -> bool:
    """Connection, timeout and streaming failures: worth retrying."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    if isinstance(exc, (HTTPClientError, BotoConnectionError, asyncio.TimeoutError, OSError)):
        return True
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - aiobotocore depends on aiohttp
        return False
    return isinstance(exc, aiohttp.ClientError)


_TIMEOUTS = (("connect_timeout", 10.0), ("read_timeout", 30.0))


def _seconds(settings: dict[str, Any], name: str, default: float) -> float:
    try:
        value = float(settings.get(name, default))
    except (TypeError, ValueError):
        value = -1.0
    if not value > 0:
        raise InvalidInput("options", f"{name} must be a positive number of seconds")
    return value


def _check_endpoint(endpoint: str) -> str:
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput("url", "endpoint_url must be an http:// or https:// URL")
    if parts.username or parts.password:
        raise InvalidInput("url", "endpoint_url must not carry credentials")
    return endpoint


class S3Storage:
    """Storage in an S3 bucket under an optional prefix; keys are relative to the prefix.

    ``clock_offset`` (seconds, server minus local) is estimated from the ``Date`` header
    of every response (:class:`qo.backend_kit.ServerClock`): within ``latency/2 + 0.5 s``
    after one request, tightening to about the round-trip time.
    """

    name = "s3"
    page_size = 1000  #: keys per ListObjectsV2 request (S3's maximum); tests lower it
    #: requests are paced per prefix of this many levels of qo's key once S3 throttled one:
    #: ``{queue}/{kind}/``, or ``{queue}/{kind}/{shard}/`` in a spread queue (qo/layout.py)
    pace_depth = 3

    def __init__(self, url: str, **options: Any):
        self.bucket, self.prefix, settings = parse_url(url)
        unknown = set(options) - set(_ALIASES) - _OPTION_ONLY
        if unknown:
            raise InvalidInput("options", f"unknown S3 options: {', '.join(sorted(unknown))}")
        for name, value in options.items():
            if value is not None:
                settings[_ALIASES.get(name, name)] = value
        for name, var in _ENV.items():
            if name not in settings and os.environ.get(var):
                settings[name] = os.environ[var]
        if bool(settings.get("key")) != bool(settings.get("secret")):
            raise ConfigurationError("S3 credentials need both an access key id and a secret access key")
        endpoint = settings.get("endpoint_url")
        self.endpoint_url: str | None = _check_endpoint(str(endpoint)) if endpoint else None
        self.region: str | None = settings.get("region") or None
        self._timeouts = tuple(_seconds(settings, name, default) for name, default in _TIMEOUTS)
        self._settings = settings
        self._secrets = tuple(str(settings[k]) for k in ("key", "secret", "token") if settings.get(k))
        _SCRUBBER.remember(self._secrets)
        try:
            import s3fs  # noqa: F401  (checked now so a missing extra fails at connect)
        except ImportError:
            raise ConfigurationError("s3:// needs s3fs: pip install 'qo-queue[s3]' (from a checkout: pip install '.[s3]')") from None
        #: the store's dialect: declared in the URL, else learned on first use (:meth:`learn_dialect`)
        self.dialect: Dialect | None = parse_dialect(settings.get("dialect"))
        self.unsafe = _flag(settings.get("unsafe"))
        self._root = self.prefix + "/" if self.prefix else ""
        self._server_clock = ServerClock()
        self.pacer = Pacer(depth=self.pace_depth)
        self._fs: Any = None
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._dialect_lock: asyncio.Lock | None = None

    @property
    def conditional_delete(self) -> bool:
        """True when ``delete(if_match=)`` is honoured by the store (known once the dialect is)."""
        return self.dialect is not None and self.dialect.conditional_delete

    def __repr__(self) -> str:
        endpoint = f", endpoint={self.endpoint_url!r}" if self.endpoint_url else ""
        return f"S3Storage(bucket={self.bucket!r}, prefix={self.prefix!r}{endpoint})"

    # -- the client ------------------------------------------------------------

    def _new_fs(self) -> Any:
        import s3fs

        s = self._settings
        style = s.get("addressing_style") or ("path" if self.endpoint_url else "auto")
        config = {
            "retries": {"total_max_attempts": 1, "mode": "standard"},  # one attempt, no retry
            "connect_timeout": self._timeouts[0],
            "read_timeout": self._timeouts[1],
            # a worker runs many slots at once: botocore's default pool of 10 queues them
            "max_pool_connections": 64,
            "s3": {"addressing_style": style},
            # checksums only where S3 requires them (DeleteObjects): S3-compatible stores differ
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
        }
        kwargs: dict[str, Any] = {}
        if s.get("profile"):
            kwargs["profile"] = s["profile"]
        fs = s3fs.S3FileSystem(
            asynchronous=True,
            skip_instance_cache=True,
            endpoint_url=self.endpoint_url,
            key=s.get("key"),
            secret=s.get("secret"),
            token=s.get("token"),
            client_kwargs={"region_name": self.region} if self.region else None,
            config_kwargs=config,
            **kwargs,
        )
        fs.retries = 1
        return fs

    async def _s3(self, key: str | None) -> Any:
        """The aiobotocore client for the running loop, created on first use."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first use, or a new event loop (e.g. asyncio.run per command)
            self._abandon()
            self._loop, self._lock, self._dialect_lock = loop, asyncio.Lock(), asyncio.Lock()
        if self._client is None:
            assert self._lock is not None
            async with self._lock:
                if self._client is None:
                    fs = self._new_fs()
                    try:
                        self._client = await fs.set_session()
                    except Exception as exc:
                        raise self._error(exc, key) from None
                    self._fs = fs
                    await self._learn_secrets(fs)
        return self._client

    async def _learn_secrets(self, fs: Any) -> None:
        """Add the credentials botocore resolved (env, profile, role) to what errors scrub."""
        try:
            creds = await fs.session.get_credentials()
            frozen = await creds.get_frozen_credentials() if creds is not None else None
        except Exception:  # best effort: only used to scrub messages
            return
        if frozen is not None:
            found = (frozen.access_key, frozen.secret_key, frozen.token)
            self._secrets = tuple(dict.fromkeys(self._secrets + tuple(s for s in found if s)))
            _SCRUBBER.remember(self._secrets)

    def _abandon(self) -> None:
        """Forget a client made on another (finished) event loop, releasing its sockets.

        aiohttp cannot close a session from another loop; marking its connectors closed
        (best effort, private API) frees the sockets and avoids "Unclosed client session".
        """
        client, self._client, self._fs = self._client, None, None
        http = getattr(getattr(client, "_endpoint", None), "http_session", None)
        for session in list((getattr(http, "_sessions", None) or {}).values()):
            close = getattr(getattr(session, "connector", None), "_close", None)
            if close is not None:
                close()

    async def close(self) -> None:
        """Close the HTTP session; the storage reconnects if used again."""
        if self._loop is not asyncio.get_running_loop():
            self._abandon()
            return
        client, self._client, self._fs = self._client, None, None
        if client is not None:
            await client.close()

    # -- plumbing --------------------------------------------------------------

    def _key(self, key: str) -> str:
        return self._root + validate_key(key)

    def _error(self, exc: BaseException, key: str | None, *, op: str = "", conditional: bool = False) -> StorageError:
        endpoint = self.endpoint_url or f"(AWS{', region ' + self.region if self.region else ''})"
        return map_error(exc, key=key, op=op, bucket=self.bucket, secrets=self._secrets, endpoint=endpoint,
                         conditional=conditional)

    async def _call(self, op: str, key: str | None, *, pace: str | None = None, **params: Any) -> dict[str, Any]:
        """One client call, paced by the prefix of ``pace`` (default ``key``): observes
        the server clock; raises the mapped error."""
        client = await self._s3(key)
        part = self.pacer.partition(pace if pace is not None else key)
        sent_at = await self.pacer.wait(part)
        t0 = time.time()
        try:
            resp = await getattr(client, op)(Bucket=self.bucket, **params)
        except Exception as exc:
            self._observe(getattr(exc, "response", None), t0, time.time())
            conditional = "IfMatch" in params or "IfNoneMatch" in params
            error = self._error(exc, key, op=op, conditional=conditional)
            self.pacer.done(part, sent_at, throttled=isinstance(error, Throttled))
            raise error from None
        self.pacer.done(part, sent_at, throttled=False)
        self._observe(resp, t0, time.time())
        return resp

    @property
    def clock_offset(self) -> float:
        """Server minus local clock, seconds."""
        return self._server_clock.offset

    @property
    def clock_observed(self) -> bool:
        """True once a response's ``Date`` header estimated ``clock_offset`` (before: 0, a guess)."""
        return self._server_clock.bounds is not None

    def _observe(self, resp: Any, t0: float, t1: float) -> None:
        """Tighten the server-clock estimate with one response's Date header."""
        try:
            date = resp["ResponseMetadata"]["HTTPHeaders"]["date"]
        except (KeyError, TypeError):
            return
        self._server_clock.observe(date, t0, t1)

    # -- the dialect -------------------------------------------------------------

    async def learn_dialect(self, *, force: bool = False) -> Dialect:
        """The store's dialect: declared, kept in ``_qo/dialect.json``, or probed now (and kept).

        Raises :class:`UnsafeStore` (one line naming what failed) when the probe shows
        the conditions are not enforced, unless the URL says ``unsafe=1`` or ``force``
        (``qo doctor``, to go on and show it).
        """
        if self.dialect is not None:
            return self.dialect
        await self._s3(None)  # the client, and the lock, for this loop
        assert self._dialect_lock is not None
        async with self._dialect_lock:
            if self.dialect is None:
                try:
                    self.dialect = await self._stored_dialect() or await self._probe(force=force)
                except StorageError as exc:
                    if "AccessDenied" not in str(exc):
                        raise
                    raise StorageError(  # the credentials may not reach _qo/: say how to do without
                        f"learning how this store answers conditional requests (under {RESERVED}) failed: "
                        f"{exc}; allow that prefix, or declare it in the URL (dialect=aws, rgw, localstack)",
                        backend=self.name, key=exc.key) from None
        return self.dialect

    async def _stored_dialect(self) -> Dialect | None:
        """The dialect kept by an earlier probe; None when there is none (or not of this version)."""
        try:
            blob = await self.get(DIALECT_KEY)
        except NotFound:
            return None
        return Dialect.from_json(blob.data)

    async def _probe(self, *, force: bool = False) -> Dialect:
        """A dozen requests on scratch keys under ``_qo/``: what the store does with
        If-Match (both spellings), If-None-Match, DELETE If-Match and a non-ASCII StartAfter."""
        import uuid

        root = f"{RESERVED}probe-{uuid.uuid4().hex[:12]}/"
        keys = [root + name for name in ("cas", "a", "\u00e9", "\u65e5")]
        try:
            dialect = await _probe_keys(self, keys)
        finally:
            for k in keys:
                try:
                    await self._call("delete_object", k, Key=self._root + k)
                except (NotFound, StorageError):
                    pass
        problem = dialect[1]
        if problem is not None:
            message = f"{self!r} cannot be used safely: {problem}"
            if not (self.unsafe or force):
                raise UnsafeStore(message + " (add unsafe=1 to the URL to use it anyway)")
        learned = attrs.evolve(dialect[0], source="probed")
        if problem is None:
            try:
                await self._call("put_object", DIALECT_KEY, Key=self._root + DIALECT_KEY, Body=learned.to_json(),
                                 IfNoneMatch="*")
            except (PreconditionFailed, StorageUnavailable):
                pass  # another process kept its (same) finding first, or the next one will
        return learned

    # -- the contract -------------------------------------------------------------

    async def get(self, key: str) -> Blob:
        """The object's bytes and etag; ``NotFound`` if the key does not exist."""
        s3key = self._key(key)
        resp = await self._call("get_object", key, Key=s3key)
        body = resp["Body"]
        try:
            async with body as stream:
                data = await stream.read()
        except Exception as exc:
            raise self._error(exc, key, op="get_object") from None
        return Blob(data, resp["ETag"])

    async def put(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        """Write the object (create-only or CAS if asked); return the new ETag."""
        s3key = self._key(key)
        params: dict[str, Any] = {"Key": s3key, "Body": check_put(data, if_match, if_none_match)}
        if if_none_match or if_match is not None:
            dialect = await self.learn_dialect()
            if if_none_match:
                params["IfNoneMatch"] = "*"
            if if_match is not None:
                params["IfMatch"] = dialect.if_match_value(if_match)
        try:
            resp = await self._call("put_object", key, **params)
        except NotFound:
            if if_match is None:
                raise
            raise PreconditionFailed("key does not exist", backend=self.name, key=key) from None
        return resp["ETag"]

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Delete the key (only at ``if_match`` if given); a missing key is not an error."""
        params: dict[str, Any] = {"Key": self._key(key)}
        if if_match is not None:
            dialect = await self.learn_dialect()
            if dialect.delete == "honoured":
                params["IfMatch"] = dialect.if_match_value(if_match)
            # else: the store would ignore the condition or refuse the request; the
            # delete is plain, as the store declares (conditional_delete is False)
        try:
            await self._call("delete_object", key, **params)
        except NotFound:
            pass

    async def delete_many(self, keys: list[str]) -> None:
        """Delete up to 1000 keys in one DeleteObjects request; missing keys are fine."""
        keys = list(keys)
        if len(keys) > 1000:
            raise InvalidInput("keys", "at most 1000 keys per delete_many call")
        if not keys:
            return
        objects = [{"Key": self._key(k)} for k in keys]
        resp = await self._call("delete_objects", None, pace=keys[0], Delete={"Objects": objects, "Quiet": True})
        for err in resp.get("Errors") or []:
            if err.get("Code") == "NoSuchKey":
                continue
            key = str(err.get("Key", ""))[len(self._root) :] or None
            status = 503 if err.get("Code") in ("SlowDown", "InternalError") else 400
            response = {"Error": err, "ResponseMetadata": {"HTTPStatusCode": status}}
            raise self._error(_ResponseError(response), key, op="delete_objects")

    async def list(self, prefix: str, *, start_after: str | None = None, limit: int = 1000) -> list[Entry]:
        """Keys starting with ``prefix`` after ``start_after``, in UTF-8 byte order, at most ``limit``."""
        validate_prefix(prefix)
        if start_after is not None and not isinstance(start_after, str):
            raise InvalidInput("start_after", "must be a string")
        out: list[Entry] = []
        params: dict[str, Any] = {"Prefix": self._root + prefix}
        after = start_after.encode("utf-8") if start_after else b""
        if start_after:
            sent = start_after
            if not start_after.isascii() and (await self.learn_dialect()).start_after == "ascii":
                sent = _ascii_head(start_after)  # every key after start_after is after this too
            if sent:
                params["StartAfter"] = self._root + sent
        cut = len(self._root)
        hide = not prefix.startswith(RESERVED)
        while len(out) < limit:
            params["MaxKeys"] = min(self.page_size, limit - len(out))
            resp = await self._call("list_objects_v2", prefix or None, **params)
            for obj in resp.get("Contents") or []:
                name = obj["Key"][cut:]
                if (hide and name.startswith(RESERVED)) or (after and name.encode("utf-8") <= after):
                    continue
                modified = obj.get("LastModified")
                out.append(
                    Entry(obj["Key"][cut:], obj.get("ETag", ""), int(obj.get("Size", 0)),
                          modified.timestamp() if modified is not None else None)
                )
            token = resp.get("NextContinuationToken")
            if not resp.get("IsTruncated") or not token:
                break
            params = {"Prefix": params["Prefix"], "ContinuationToken": token}
        return out[:limit]


async def _probe_keys(st: S3Storage, keys: list[str]) -> tuple[Dialect, str | None]:
    """Probe on ``keys`` (cas, then three for listing): the dialect, and what makes the
    store unsafe (``None``: nothing; the rest is probed anyway, for ``qo doctor``)."""
    cas, *listed = keys

    async def put(key: str, body: bytes, **cond: str) -> str | None:
        """The new etag, or None when the condition was refused (412)."""
        try:
            return (await st._call("put_object", key, Key=st._root + key, Body=body, **cond))["ETag"]
        except PreconditionFailed:
            return None

    first = await put(cas, b"1")
    assert first is not None
    if_match = "quoted"
    second = await put(cas, b"2", IfMatch=first)
    if second is None:
        if_match = "unquoted"
        second = await put(cas, b"2", IfMatch=first.strip('"'))
        if second is None:
            return Dialect(), "a compare-and-swap with the current etag was refused, quoted or not"
    dialect = Dialect(if_match=if_match)
    problem = None
    if await put(cas, b"3", IfMatch=dialect.if_match_value(first)) is not None:
        problem = "a compare-and-swap on a stale etag succeeded (If-Match is not enforced)"
    elif await put(cas, b"4", IfNoneMatch="*") is not None:
        problem = "a create-only write overwrote an existing object (If-None-Match is not enforced)"
    delete = await _probe_delete(st, cas, dialect.if_match_value(first))
    for k in listed:
        await put(k, b"")
    resp = await st._call("list_objects_v2", None, Prefix=st._root + cas.rsplit("/", 1)[0] + "/",
                          StartAfter=st._root + listed[1])
    after = [obj["Key"][len(st._root):] for obj in resp.get("Contents") or []]
    start_after = "exact" if after == [listed[2]] else "ascii"
    return attrs.evolve(dialect, delete=delete, start_after=start_after), problem


async def _probe_delete(st: S3Storage, key: str, stale: str) -> str:
    """``honoured``, ``ignored`` or ``refused``: DELETE ``key`` at a stale etag."""
    try:
        await st._call("delete_object", key, Key=st._root + key, IfMatch=stale)
    except PreconditionFailed:
        return "honoured"
    except StorageUnavailable:
        raise
    except StorageError:  # 501 NotImplemented (LocalStack), 400...: the request is refused
        return "refused"
    try:
        await st.get(key)
    except NotFound:
        return "ignored"
    return "refused"  # neither refused nor deleted: no answer to rely on


def _ascii_head(text: str) -> str:
    """``text`` up to its first non-ASCII character: sorts at or before it in UTF-8 order."""
    for i, char in enumerate(text):
        if not char.isascii():
            return text[:i]
    return text


def _flag(value: Any) -> bool:
    """A URL's boolean: 1/true/yes/on or 0/false/no/off (or absent)."""
    if value is None or value is False:
        return False
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return False
    raise InvalidInput("url", f"unsafe must be 1 or 0 (got {text[:20]!r})")


class _ResponseError(Exception):
    """A per-key DeleteObjects error, shaped like a botocore ClientError for ``map_error``."""

    def __init__(self, response: dict[str, Any]):
        super().__init__("DeleteObjects error")
        self.response = response
