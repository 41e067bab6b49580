"""`pacsbridge worker`: send queued deliveries to their PACS until stopped, or until nothing is due (--drain).

SIGTERM and SIGINT stop the worker gracefully: it records the C-STORE
response it is waiting for, returns the group's unsent deliveries to the
queue and exits. The forwarding policy (retry delays, lease length and so on)
comes from PACSBRIDGE_FORWARD_* variables, see pacsbridge.forward.policy.

With --drain the worker reports on stderr what is still left to do at the
end: per destination the deliveries still queued, retrying, held or needing
attention, which destinations are down, and how to release held deliveries.
It exits with status 0 only when no delivery is left waiting (queued, being
sent, retrying or held) and every delivery handled in the run was stored.
Needs-attention and failed deliveries from earlier runs are reported but do
not change the status.
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
from pacsbridge.db.models import utc_now
from pacsbridge.forward.policy import ForwardingPolicy, PolicyError
from pacsbridge.forward.status import OutstandingWork, find_outstanding
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
            "--drain",
            help="Exit once nothing is due, and report what is left. Status 0 only when nothing is left waiting "
            "(queued, retrying or held) and every delivery handled in this run was stored, else 1.",
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
        if not drain:
            return
        with sessions.begin() as session:
            outstanding = find_outstanding(session)
    _report_drain(summaries, outstanding)


def _report_drain(summaries: list[WorkerSummary], outstanding: OutstandingWork) -> None:
    """Print what the run left undone to stderr, and exit with status 1 when anything is left waiting or failed."""
    handled = sum(len(summary.final_states) for summary in summaries)
    not_stored = handled - sum(summary.count_stored() for summary in summaries)
    if not_stored:
        typer.echo(
            f"{not_stored} of the {handled} {'delivery' if handled == 1 else 'deliveries'} handled in this run "
            f"{'was' if not_stored == 1 else 'were'} not stored.",
            err=True,
        )
    lines = outstanding.lines(utc_now())
    if lines:
        typer.echo("Left to do:", err=True)
        for line in lines:
            typer.echo(f"  {line}", err=True)
    if not_stored or outstanding.waiting:
        typer.echo('See "pacsbridge deliveries" for each delivery\'s state and reason.', err=True)
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
