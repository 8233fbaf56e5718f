"""Reachability of Beam's portable services before a run starts.

With ``--runner PortableRunner`` (and the Flink / Spark job servers, which speak the
same job API) the job goes to ``--job_endpoint`` and, with
``--environment_type=EXTERNAL``, its work to the SDK worker pool at
``--environment_config``. A worker pool that is not there makes the job wait
forever without a word; so both endpoints are checked first and a missing one is
refused with one line naming the flag and the address.

The worker-pool address is checked only where it means the same thing to this
process as to the job service: with PortableRunner and a job service on this
machine. On a cluster ``--environment_config=localhost:50000`` names each
worker's own sidecar, which the submitting machine cannot (and need not) reach.
"""

from __future__ import annotations

from collections.abc import Sequence

CHECK_TIMEOUT_S = 10.0


class PortableEndpointError(RuntimeError):
    """A portable-runner endpoint given after `--` does not answer; the message is one line."""


_LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")


def _host(address: str) -> str:
    return address.rsplit(":", 1)[0] if ":" in address else address


def portable_endpoints(args: Sequence[str], runner: str = "PortableRunner") -> list[tuple[str, str]]:
    """(flag, host:port) of the job service and the external worker pool named by Beam flags
    that this process can check (see the module docstring)."""
    if runner != "PortableRunner":
        return []
    flags = dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)
    out = []
    job = flags.get("--job_endpoint", "")
    if job and job != "embed":
        out.append(("--job_endpoint", job))
    local_service = not job or job == "embed" or _host(job) in _LOCAL_HOSTS
    pool = flags.get("--environment_config", "")
    if flags.get("--environment_type", "").upper() == "EXTERNAL" and pool and local_service:
        out.append(("--environment_config", pool))
    return out


def check_portable_endpoints(args: Sequence[str], runner: str = "PortableRunner",
                             timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Raise PortableEndpointError for the first endpoint that does not answer within ``timeout_s``."""
    endpoints = portable_endpoints(args, runner)
    if not endpoints:
        return
    import grpc  # Beam's dependency, only needed here

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
