"""The Typer application that every command module registers on."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="pacsbridge",
    help="Forward ultrasound studies to hospital PACS/VNA and query the Modality Worklist.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Wide enough that option names and their help are not cut off in pipes and CI logs.
    context_settings={"max_content_width": 120},
)
