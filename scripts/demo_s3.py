"""`make demo-s3`: the demo pipeline with S3 wherever a cluster uses it, on one machine.

Starts moto's S3 server on 127.0.0.1, uploads the demo data set, and runs the real DAG through
kfp.local with the data set, MLflow's artifact store and the registered models' sources on that
S3 endpoint. Prints the run summary and each registered version's `s3://` source.

    python scripts/demo_s3.py [--config configs/demo.yaml] [--data work/data/demo] [--set KEY=VALUE]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import boto3
from mlflow.tracking import MlflowClient
from moto.server import ThreadedMotoServer

from safe_rlhf_v import storage
from safe_rlhf_v.cli import default_config_path
from safe_rlhf_v.config import load_config
from safe_rlhf_v.pipelines.local import run_local
from safe_rlhf_v.summary import format_summary

BUCKET = "safe-rlhf-v-demo"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(default_config_path()))
    parser.add_argument("--data", default="work/data/demo", help="local demo data to upload")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # Fake credentials for the local fake endpoint only; a cluster takes them from a Secret.
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "demo",
            "AWS_SECRET_ACCESS_KEY": "demo",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": endpoint,
            "MLFLOW_S3_ENDPOINT_URL": endpoint,
        }
    )
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        data_uri = f"s3://{BUCKET}/data/demo"
        print(f"S3 endpoint {endpoint}: uploading {args.data} to {data_uri}")
        storage.upload(Path(args.data), data_uri)
        cfg = load_config(
            args.config,
            overrides=[
                f"data.uri={data_uri}",
                "work_dir=work/demo-s3",
                f"tracking.artifact_location=s3://{BUCKET}/mlflow",
                f"registry.publish_uri=s3://{BUCKET}/models",
                *args.set,
            ],
        )
        run = run_local(cfg)
        print(format_summary(run))
        if run.succeeded:
            client = MlflowClient(run.tracking_uri)
            for role, model_uri in sorted(run.stages["register"]["outputs"].items()):
                name, version = model_uri.removeprefix("models:/").split("/")
                source = client.get_model_version(name, version).source
                print(f"registered {role:<7} {model_uri:<32} source {source}")
            keys = storage.list_files(f"s3://{BUCKET}/mlflow")
            print(f"MLflow artifacts on S3: {len(keys)} files under s3://{BUCKET}/mlflow")
        return 0 if run.succeeded else 1
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
