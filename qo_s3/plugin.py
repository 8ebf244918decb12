"""Registers the S3 backend for ``s3://`` URLs (placeholder until the backend lands)."""

import qo


@qo.hookimpl
def qo_storage_schemes():
    return ["s3"]
