"""A local S3 server (moto's) with one bucket, for tests of ``s3://`` storage URIs without a
cloud account: pyarrow's S3 file system talks to it over HTTP like to any S3 endpoint."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from orchestrator.testing.distributed import free_port

# What a client needs to reach the server: fake credentials, no instance-metadata lookups.
ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@contextmanager
def local_s3(bucket: str = "runs") -> Iterator[str]:
    """Start the server, create ``bucket``, set the client environment; yields a URI prefix
    such as ``s3://runs/?endpoint_override=127.0.0.1:PORT&scheme=http&region=us-east-1``
    without a path, to pass to ``storage.join``."""
    import logging

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    try:
        query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}?{query}&allow_bucket_creation=true")
        fs.create_dir(bucket)
        yield f"s3://{bucket}/?{query}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
