"""Reaching what the Prefect platform keeps for a run: the API key's Secret block, the AWS credentials block.

The run's settings name where a key or credentials live, never the values: each process that
sends (the flow, a child run, a Dask worker) reads them here.

Usage:
    >>> api_key = await resolve_api_key("OPENAI_API_KEY", None)            # from the environment
    >>> api_key = await resolve_api_key(None, "openai-key")                # from a Secret block
    >>> transport_params = await transport_params_for("my-aws-credentials")  # an S3 client for smart-open
"""

# Standard library imports
import os
from typing import Any, Dict, Optional


async def resolve_api_key(env_var: Optional[str], secret_block: Optional[str]) -> Optional[str]:
    """Read the API key from a Prefect Secret block, or else from an environment variable."""
    if secret_block:
        from prefect.blocks.system import Secret

        secret = await Secret.aload(secret_block)
        return secret.get()
    return os.environ.get(env_var) if env_var else None


async def transport_params_for(aws_credentials_block: Optional[str]) -> Optional[Dict[str, Any]]:
    """smart-open's transport parameters: an S3 client from a prefect-aws block, or None (standard AWS config)."""
    if not aws_credentials_block:
        return None
    try:
        from prefect_aws import AwsCredentials
    except ImportError as error:
        raise RuntimeError("aws_credentials_block needs the prefect-aws package (pip install prefect-aws)") from error
    credentials = await AwsCredentials.aload(aws_credentials_block)
    return {"client": credentials.get_boto3_session().client("s3")}
