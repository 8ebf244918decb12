"""qo-azure: an Azure Blob Storage backend for qo, serving ``az://container/prefix`` URLs.

Importing the package is cheap (the plugin is loaded by every ``qo`` process); the
Azure SDK is imported with :mod:`qo_azure.storage`, when an ``az://`` URL is opened.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AzureStorage", "check_blob_name"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "AzureStorage":
        from .storage import AzureStorage

        return AzureStorage
    if name == "check_blob_name":
        from .settings import check_blob_name

        return check_blob_name
    raise AttributeError(name)
