"""`pacsbridge demo`: run the main job against sandbox SCPs on this machine."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from pacsbridge.cli.app import app
from pacsbridge.cli.common import EXIT_FAILED, fail
from pacsbridge.config import ConfigError, load_config
from pacsbridge.demo import CALLING_AE_TITLE, Demo


@app.command("demo")
def demo_command(
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Folder for the SQLite database, the test study and received files."),
    ] = None,
    smoke: Annotated[
        bool, typer.Option("--smoke", help="Run once and exit: 0 only when every instance arrived intact.")
    ] = False,
) -> None:
    """Start a sandbox PACS and worklist, echo both, send a test study for a worklist patient, and check it arrived.

    Without --smoke the sandbox SCPs keep running until interrupted, so other
    commands (echo, store, worklist) can be tried against them.
    """
    try:
        config = load_config(data_dir)
    except ConfigError as exc:
        fail(f"error: {exc}", 2)
    demo = Demo(config)
    try:
        demo.start()
    except (ConfigError, OSError) as exc:
        fail(f"error: could not start the demo: {exc}")
    try:
        typer.echo(f"Sandbox PACS: AE title {demo.storage.ae_title} at 127.0.0.1:{demo.storage.port}")
        typer.echo(f"Sandbox MWL:  AE title {demo.worklist.ae_title} at 127.0.0.1:{demo.worklist.port}")
        result = demo.run(typer.echo)
        intact = sum(arrival.intact for arrival in result.arrivals)
        if result.ok:
            typer.echo(f"Demo succeeded: {intact} of {len(result.arrivals)} instances arrived intact.")
        else:
            typer.echo(f"Demo failed: {result.error or f'{intact} of {len(result.arrivals)} arrived intact'}.", err=True)
        if smoke:
            if not result.ok:
                raise typer.Exit(EXIT_FAILED)
            return
        _serve_until_interrupted(demo)
    finally:
        demo.stop()


def _serve_until_interrupted(demo: Demo) -> None:
    # Show the command as it was started (such as .venv/bin/pacsbridge), so the
    # examples work without an activated virtual environment.
    command = sys.argv[0] if Path(sys.argv[0]).name == "pacsbridge" else "pacsbridge"
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    typer.echo(
        "\nThe sandbox SCPs keep running; press Ctrl+C to stop. Try for example:\n"
        f"  {command} echo 127.0.0.1 {demo.storage.port} --calling-aet {CALLING_AE_TITLE} "
        f"--called-aet {demo.storage.ae_title}\n"
        f"  {command} worklist 127.0.0.1 {demo.worklist.port} --calling-aet {CALLING_AE_TITLE} "
        f"--called-aet {demo.worklist.ae_title}\n"
        f"  {command} store 127.0.0.1 {demo.storage.port} {demo.config.data_dir / 'test-study'} "
        f"--calling-aet {CALLING_AE_TITLE} --called-aet {demo.storage.ae_title}"
    )
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    typer.echo("Stopped.")
