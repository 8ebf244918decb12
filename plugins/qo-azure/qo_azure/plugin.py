"""The qo plugin: serves ``az://`` URLs (entry point ``azure`` in the ``qo`` group)."""

from __future__ import annotations

from typing import Any

import qo


@qo.hookimpl
def qo_storage_schemes() -> list[str]:
    return ["az"]


@qo.hookimpl
def qo_storage(url: str, options: dict[str, Any]) -> Any:
    """An :class:`qo_azure.storage.AzureStorage` for ``az://`` URLs, else ``None``."""
    if url[:5].lower() != "az://":
        return None  # not ours: the next plugin is asked
    try:
        import azure.storage.blob.aio  # noqa: F401
    except ImportError:
        raise qo.ConfigurationError("az:// needs azure-storage-blob and aiohttp: pip install qo-azure (from a checkout: pip install ./plugins/qo-azure)") from None
    from .storage import AzureStorage

    return AzureStorage(url, **options)
