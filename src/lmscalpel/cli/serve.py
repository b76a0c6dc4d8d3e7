"""``serve``: the live editing service (HTTP API, journal, web page) on one model."""

from __future__ import annotations

import ipaddress
import os
import secrets
from pathlib import Path
from typing import Annotated

import typer

from lmscalpel.cli.app import (
    DeviceOption,
    DtypeOption,
    ModelOption,
    app,
    console,
    friendly,
    load,
    placement,
    report_error,
)

TOKEN_ENV = "LMSCALPEL_TOKEN"
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token(token_file: Path | None) -> str | None:
    """The bearer token from ``token_file`` (first line, stripped) or ``$LMSCALPEL_TOKEN``."""
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise typer.BadParameter(
                f"cannot read {token_file}: {error}", param_hint="--token-file"
            ) from None
        if not token:
            raise typer.BadParameter(f"{token_file} is empty", param_hint="--token-file")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


@app.command()
@friendly
def serve(
    model: ModelOption = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    journal: Annotated[
        Path, typer.Option(help="Journal folder: edits are written here and replayed on start.")
    ] = Path("lmscalpel-journal"),
    host: Annotated[
        str, typer.Option(help="Address to listen on; anything but loopback needs a token.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=0, max=65535)] = 8000,
    token_file: Annotated[
        Path | None,
        typer.Option(
            help=f"File holding the bearer token (else ${TOKEN_ENV}; else, on "
            "loopback only, a random one is made and printed)."
        ),
    ] = None,
    chat: Annotated[
        bool, typer.Option("--chat", help="Wrap prompts in the chat template.")
    ] = False,
) -> None:
    """Serve a model for live editing: JSON API under /v1, web page at /, audit journal."""
    token = read_token(token_file)
    if token is None and not is_loopback(host):
        report_error(
            ValueError(
                f"refusing to listen on {host} without a token: give --token-file or set "
                f"{TOKEN_ENV}"
            )
        )
        raise typer.Exit(2)
    made = token is None
    token = token or secrets.token_urlsafe(24)

    import uvicorn

    from lmscalpel.service import JournalError, create_app

    lm = load(model, chat, **placement(device, dtype))
    try:
        with console.status(f"replaying the journal {journal}..."):
            application = create_app(lm, journal, token)
    except JournalError as error:
        report_error(error)
        raise typer.Exit(2) from None
    service = application.state.service
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    console.print(
        f"serving {lm.name} (fingerprint {lm.fingerprint}) with {len(service.applied)} applied "
        f"edit(s) from {journal}"
    )
    if made:
        console.print(f"open {url}#token={token}  (a fresh token; edits need it)", soft_wrap=True)
    else:
        console.print(f"open {url}", soft_wrap=True)
    try:
        uvicorn.run(application, host=host, port=port, log_level="warning")
    finally:
        service.close()
