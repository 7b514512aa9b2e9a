"""The S3 client every mirror uses (assets, checkpoints): credentials from the environment only."""

from __future__ import annotations

from runtime.config import S3Config
from runtime.errors import InputError


def s3_client(config: S3Config):
    """A boto3 S3 client for `config` (endpoint, region), with retries; fails in one clear line
    when no credentials are available."""
    import boto3
    from botocore.config import Config

    if not config.bucket:
        raise InputError("s3.bucket is not set: the S3 mirror needs a bucket")
    session = boto3.session.Session()
    if session.get_credentials() is None:
        raise PermissionError(
            f"S3 mirror s3://{config.bucket}/{config.prefix} is configured but no AWS credentials "
            "are in the environment (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
            "an instance role)"
        )
    return session.client(
        "s3",
        region_name=config.region,
        endpoint_url=config.endpoint_url,
        config=Config(retries={"max_attempts": 3, "mode": "standard"}),
    )
