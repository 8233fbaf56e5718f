#!/usr/bin/env python3
"""A Python stand-in for the Beam SDK container's ``boot`` program, for ``worker_pool_main``.

    python -m apache_beam.runners.worker.worker_pool_main --service_port=50000 \\
        --container_executable=/path/to/beam_boot.py

Started plainly, ``worker_pool_main`` runs each SDK worker as a bare ``SdkHarness``
that never receives the job's pipeline options: Beam's own file IO then has no
options on the workers, and ``s3://`` reads and writes fail with "Must provide
one of client or options". The SDK container's ``boot`` asks the job's provision
service for the options first and hands them to ``sdk_worker_main``; this script
does the same with the Python that runs it (so the worker uses that Python's
packages, whatever ``python`` is first on PATH).

Arguments are the container contract's: --id, --logging_endpoint,
--artifact_endpoint, --provision_endpoint, --control_endpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile


def main(argv: list[str]) -> None:
    import grpc
    from apache_beam.portability.api import beam_provision_api_pb2, beam_provision_api_pb2_grpc, endpoints_pb2
    from google.protobuf import json_format, text_format

    parser = argparse.ArgumentParser()
    for name in ("id", "logging_endpoint", "artifact_endpoint", "provision_endpoint", "control_endpoint"):
        parser.add_argument(f"--{name}", default="")
    args, _ = parser.parse_known_args(argv)

    with grpc.insecure_channel(args.provision_endpoint) as channel:
        stub = beam_provision_api_pb2_grpc.ProvisionServiceStub(channel)
        info = stub.GetProvisionInfo(beam_provision_api_pb2.GetProvisionInfoRequest(),
                                     metadata=[("worker_id", args.id)]).info

    def descriptor(url: str, given) -> str:
        return text_format.MessageToString(given if given.url else endpoints_pb2.ApiServiceDescriptor(url=url))

    env = dict(os.environ)
    env.update({
        "WORKER_ID": args.id,
        "PIPELINE_OPTIONS": json_format.MessageToJson(info.pipeline_options),
        "CONTROL_API_SERVICE_DESCRIPTOR": descriptor(args.control_endpoint, info.control_endpoint),
        "LOGGING_API_SERVICE_DESCRIPTOR": descriptor(args.logging_endpoint, info.logging_endpoint),
        "SEMI_PERSISTENT_DIRECTORY": tempfile.mkdtemp(prefix="beam-worker-"),
        "RUNNER_CAPABILITIES": " ".join(info.runner_capabilities),
    })
    os.execve(sys.executable, [sys.executable, "-m", "apache_beam.runners.worker.sdk_worker_main"], env)


if __name__ == "__main__":
    main(sys.argv[1:])
