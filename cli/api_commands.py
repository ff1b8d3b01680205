"""``lmjobs serve`` (the OpenAI Batch API over lmjobs) and ``lmjobs keys create|list|revoke``.

``register(app)`` adds them to the ``lmjobs`` app (cli/main.py). Each command parses, calls
one service, renders; FastAPI and uvicorn are imported only by ``serve``.
"""

from __future__ import annotations

import typer

from lmjobs.cli import context, render

JsonOut = typer.Option(False, "--json", help="Machine-readable output")
keys_app = typer.Typer(help="Keys of the HTTP API (`lmjobs serve`).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.add_typer(keys_app, name="keys")


def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on"),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="Port to listen on"),
) -> None:
    """Serve OpenAI's Files and Batches API (/v1/files, /v1/batches) on this database and broker.

    Point the openai client's base_url at http://HOST:PORT/v1, with a key from `lmjobs keys create`.
    """
    import uvicorn

    from lmjobs.api.app import create_app

    settings = context.settings()
    app = create_app(settings, context.database(), context.publisher())
    render.err.print(f"lmjobs serve: http://{host}:{port}/v1 (files in {settings.files_path})")
    # The access log has method, path and status, never headers: keys stay out of the logs.
    uvicorn.run(app, host=host, port=port, log_level="info", server_header=False)


@keys_app.command("create")
def keys_create(
    name: str = typer.Argument(..., help="A unique label for the key"), as_json: bool = JsonOut
) -> None:
    """Make a key. It is printed once and stored only as a hash: keep it."""
    from lmjobs.jobs.keys import create_key

    info, key = create_key(context.database(), name)
    if as_json:
        render.dump_json({"name": info.name, "key": key, "created_at": info.created_at})
        return
    render.out.print(key, highlight=False)
    render.err.print(f"key {info.name!r} created; it is shown only now", highlight=False)


@keys_app.command("list")
def keys_list(as_json: bool = JsonOut) -> None:
    """Every key: name, its first characters, when made, when revoked."""
    from lmjobs.jobs.keys import list_keys

    items = list_keys(context.database())
    if as_json:
        render.dump_json(
            [
                {"name": k.name, "prefix": k.prefix, "created_at": k.created_at, "revoked_at": k.revoked_at}
                for k in items
            ]
        )
        return
    render.table(
        ["name", "key starts", "created (UTC)", "revoked (UTC)"],
        [
            (
                k.name,
                f"{k.prefix}…",
                f"{k.created_at:%Y-%m-%d %H:%M}",
                f"{k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "",
            )
            for k in items
        ],
    )


@keys_app.command("revoke")
def keys_revoke(name: str = typer.Argument(..., help="The key's name"), as_json: bool = JsonOut) -> None:
    """Revoke a key: every request with it is refused (401) from now on."""
    from lmjobs.jobs.keys import revoke_key

    info = revoke_key(context.database(), name)
    if as_json:
        render.dump_json({"name": info.name, "revoked_at": info.revoked_at})
    else:
        render.out.print(f"key {info.name!r} revoked")
