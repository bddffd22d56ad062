"""A real S3-compatible server over HTTP for the artifact store's tests.

moto's ``ThreadedMotoServer`` (the ``moto[server]`` package): a werkzeug HTTP server in a thread
of the test process, speaking the S3 REST API on a free port of 127.0.0.1. The store reaches it
over real sockets with signed requests, as it reaches AWS, MinIO or any S3-compatible service;
boto3 (which moto depends on) plays the bucket's administrator.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

REGION = "us-east-1"
ACCESS_KEY = "edgeloop-test-key"  # moto accepts any credentials; these are signed like real ones
SECRET_KEY = "edgeloop-test-secret"
_buckets = itertools.count(1)


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:<port>

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    def new_bucket(self, *, public_read: bool = False) -> str:
        """A fresh bucket; ``public_read``: anyone may GET its objects (a CDN origin)."""
        name = f"edgeloop-artifacts-{next(_buckets)}"
        s3 = self.client()
        s3.create_bucket(Bucket=name)
        if public_read:
            policy = {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": "*",
                        "Action": "s3:GetObject",
                        "Resource": f"arn:aws:s3:::{name}/*",
                    }
                ],
            }
            s3.put_bucket_policy(Bucket=name, Policy=json.dumps(policy))
        return name

    def store_settings(self, bucket: str, prefix: str = "models") -> dict[str, Any]:
        """The server settings that put its artifact store in ``bucket``."""
        return {
            "artifact_store_url": f"s3://{bucket}/{prefix}",
            "artifact_s3_endpoint_url": self.endpoint,
            "artifact_s3_region": REGION,
            "artifact_s3_access_key_id": ACCESS_KEY,
            "artifact_s3_secret_access_key": SECRET_KEY,
        }

    def pending_uploads(self, bucket: str) -> list[dict[str, Any]]:
        """Multipart uploads started and neither completed nor aborted."""
        return list(self.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []))


@contextmanager
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3Server(f"http://{host}:{port}")
    finally:
        server.stop()
