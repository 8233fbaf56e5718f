"""Reachability of Beam's portable services before a run starts.

With ``--runner PortableRunner`` (and the Flink / Spark job servers, which speak the
same job API) the job goes to ``--job_endpoint`` and, with
``--environment_type=EXTERNAL``, its work to the SDK worker pool at
``--environment_config``. A worker pool that is not there makes the job wait
forever without a word; so both endpoints are checked first and a missing one is
refused with one line naming the flag and the address.
"""

from __future__ import annotations

from collections.abc import Sequence

CHECK_TIMEOUT_S = 10.0


class PortableEndpointError(RuntimeError):
    """A portable-runner endpoint given after `--` does not answer; the message is one line."""


def portable_endpoints(args: Sequence[str]) -> list[tuple[str, str]]:
    """(flag, host:port) of the job service and the external worker pool named by Beam flags."""
    flags = dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)
    out = []
    job = flags.get("--job_endpoint", "")
    if job and job != "embed":
        out.append(("--job_endpoint", job))
    if flags.get("--environment_type", "").upper() == "EXTERNAL" and flags.get("--environment_config"):
        out.append(("--environment_config", flags["--environment_config"]))
    return out


def check_portable_endpoints(args: Sequence[str], timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Raise PortableEndpointError for the first endpoint that does not answer within ``timeout_s``."""
    endpoints = portable_endpoints(args)
    if not endpoints:
        return
    import grpc  # noqa: PLC0415 (Beam's dependency; only needed here)

    for flag, address in endpoints:
        channel = grpc.insecure_channel(address)
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            what = ("an SDK worker pool (python -m apache_beam.runners.worker.worker_pool_main "
                    "--service_port=PORT, started with the job's python first on PATH)"
                    if flag == "--environment_config" else "a Beam job service")
            raise PortableEndpointError(f"{flag}={address}: nothing answers there within {timeout_s:.0f} s; "
                                        f"start {what} first") from None
        finally:
            channel.close()
