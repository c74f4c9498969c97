"""`maisi2 serve`: the local web app (choose or upload a mask, place tumours, generate, inspect, download).

    maisi2 serve [--model DIR] [--library DIR] [--port 8000] [--out maisi2_web]
"""

from __future__ import annotations

from maisi2.errors import InvalidInput


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="a local web app: masks, tumour placement, generation, viewer, downloads",
        description=(
            "Start a web app on this machine. It prints a URL with a random access token (as Jupyter "
            "does): open it in a browser. Masks, results and their reports are kept in --out; "
            "generation runs one job at a time, the others queue behind it. Ctrl-C stops the server "
            "and cancels what is running (nothing is left half-written)."
        ),
    )
    p.add_argument("--model", action="append", default=None, metavar="DIR",
                   help="a model folder to offer (repeat for several; the first is the default); "
                        "default: the bundled model")
    p.add_argument("--library", default=None, metavar="DIR", help="a folder of MAISI label maps to choose masks from (indexed as by `maisi2 masks index`); "
                        "default: the bundled library")
    p.add_argument("--out", default="maisi2_web", metavar="DIR",
                   help="folder for masks, results and reports (default ./maisi2_web)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--max-upload-mb", type=float, default=512, metavar="MB",
                   help="largest upload accepted (default 512)")
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    import secrets
    import socket

    import uvicorn

    from maisi2.web.app import create_app
    from maisi2.web.workspace import Workspace

    if not 0 < args.port < 65536:
        raise InvalidInput(f"--port must be between 1 and 65535, got {args.port}")
    if not args.max_upload_mb > 0:
        raise InvalidInput(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    models = _models(args.model)
    if args.library is not None:
        from maisi2.masks.library import load_library

        print(load_library(args.library).summary())  # refuses an empty or unreadable library now
    with socket.socket() as probe:  # a busy port: say so before anything starts
        try:
            probe.bind((args.host, args.port))
        except OSError as err:
            raise InvalidInput(f"cannot listen on {args.host}:{args.port} ({err.strerror}); choose another --port") from None
    workspace = Workspace(args.out, models, library=args.library, max_upload_bytes=int(args.max_upload_mb * 2**20))
    token = secrets.token_urlsafe(24)
    print(f"maisi2 serve: masks and results in {workspace.root}")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"maisi2 serve: listening on {args.host}: other machines can reach this server (the token still guards it)")
    print(f"Open in a browser (the token in it is your access key):\n\n    http://{_display(args.host)}:{args.port}/?token={token}\n",
          flush=True)
    uvicorn.run(create_app(workspace, token), host=args.host, port=args.port, log_level="warning")
    return 0


def _models(folders: list[str] | None) -> dict[str, str | None]:
    """Page name -> folder; each folder checked now (not when the first job runs)."""
    from pathlib import Path

    from maisi2.models import read_model_info

    if not folders:
        return {"bundled": None}
    named = {}
    for folder in folders:
        info = read_model_info(folder)  # refuses a folder that is not a model
        name = Path(folder).expanduser().resolve().name
        while name in named:
            name += "'"
        named[name] = str(info.model_dir)
    return named


def _display(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0") else host
