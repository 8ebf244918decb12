"""Registers the S3 backend for ``s3://`` URLs."""

from __future__ import annotations

from typing import Any

import qo


@qo.hookimpl
def qo_storage_schemes() -> list[str]:
    return ["s3"]


@qo.hookimpl
def qo_storage(url: str, options: dict[str, Any]) -> Any:
    """An :class:`qo_s3.storage.S3Storage` for ``s3://`` URLs, else ``None``."""
    if url[:5].lower() != "s3://":
        return None
    try:
        import s3fs  # noqa: F401
    except ImportError:
        raise qo.ConfigurationError("s3:// needs s3fs: pip install 'qo-queue[s3]' (from a checkout: pip install '.[s3]')") from None
    from .storage import S3Storage

    return S3Storage(url, **options)
