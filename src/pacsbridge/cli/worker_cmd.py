"""`pacsbridge worker`: send queued deliveries to their PACS until stopped, or until nothing is due (--drain).

SIGTERM and SIGINT stop the worker gracefully: it records the C-STORE
response it is waiting for, returns the group's unsent deliveries to the
queue and exits. The forwarding policy (retry delays, lease length and so on)
comes from PACSBRIDGE_FORWARD_* variables, see pacsbridge.forward.policy.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Annotated

import typer

from pacsbridge.cli.app import app
from pacsbridge.cli.common import EXIT_FAILED, EXIT_INVALID_INPUT, fail
from pacsbridge.cli.connections_cmd import (
    BindAddressOption,
    DataDirOption,
    load_config_or_exit,
    open_sessions,
)
from pacsbridge.forward.policy import ForwardingPolicy, PolicyError
from pacsbridge.forward.worker import Worker, WorkerSummary
from pacsbridge.ingest.blobstore import BlobStore
from pacsbridge.observe.logging import configure_logging

LOGGER = logging.getLogger(__name__)

MAX_CONCURRENCY = 32


@app.command("worker")
def worker_command(
    drain: Annotated[
        bool,
        typer.Option(
            "--drain", help="Exit once nothing is due: status 0 when every delivery handled was stored, else 1."
        ),
    ] = False,
    concurrency: Annotated[
        int, typer.Option("--concurrency", metavar="N", help=f"Workers in this process (1-{MAX_CONCURRENCY}).")
    ] = 1,
    bind_address: BindAddressOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Send queued deliveries to their PACS: one association per study and destination, with retries."""
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        fail(f"error: --concurrency {concurrency} is invalid: use 1 to {MAX_CONCURRENCY}.", EXIT_INVALID_INPUT)
    try:
        policy = ForwardingPolicy.from_env(os.environ)
    except PolicyError as exc:
        fail(f"error: {exc}.", EXIT_INVALID_INPUT)
    if "PACSBRIDGE_LOG_LEVEL" not in os.environ:
        # A service logs its starts, stops, retries and errors by default.
        configure_logging("INFO")

    config = load_config_or_exit(data_dir, bind_address=bind_address)
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        LOGGER.info("Received %s: stopping after the current C-STORE response", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    with open_sessions(data_dir, config=config) as sessions:
        blobs = BlobStore(config.blob_dir)
        workers = [
            Worker(sessions, blobs, policy=policy, bind_address=config.bind_address, stop=stop)
            for _ in range(concurrency)
        ]
        summaries = _run_all(workers, drain=drain)

    if drain and not all(summary.all_stored for summary in summaries):
        not_stored = sum(len(summary.final_states) for summary in summaries) - sum(
            summary.count_stored() for summary in summaries
        )
        typer.echo(
            f"{not_stored} deliveries were not stored: see 'pacsbridge deliveries' for their state and reasons.",
            err=True,
        )
        raise typer.Exit(EXIT_FAILED)


def _run_all(workers: list[Worker], *, drain: bool) -> list[WorkerSummary]:
    if len(workers) == 1:
        return [workers[0].run(drain=drain)]
    threads = [
        threading.Thread(target=worker.run, kwargs={"drain": drain}, name=f"worker-{index}")
        for index, worker in enumerate(workers, start=1)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        # A timed join keeps the main thread able to run the signal handlers.
        while thread.is_alive():
            thread.join(timeout=0.5)
    return [worker.summary for worker in workers]
