"""qo's S3 backend (s3fs / aiobotocore): ``s3://bucket/prefix`` URLs."""
