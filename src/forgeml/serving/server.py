"""Run the app under uvicorn: one process, the model loaded once; SIGTERM (or Ctrl-C) stops
accepting connections, lets the requests in flight finish (up to the request timeout), and exits 0."""

import math
import signal
import socket
from pathlib import Path

import torch

from forgeml.errors import ForgeError
from forgeml.recipe import refuse_masked
from forgeml.serving.app import create_app
from forgeml.serving.backends import open_model
from forgeml.serving.config import ServeConfig


def run_server(run_dir: Path, cfg: ServeConfig) -> None:
    import uvicorn

    # The run's recipe.yaml holds the key masked: serving with the mask as key would let anyone in.
    refuse_masked("serve.api_key", cfg.api_key, "give the key with --api-key KEY or FORGEML_API_KEY=KEY")
    check_address(cfg.host, cfg.port)  # before the model loads: a taken port should not cost that wait
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # this process serves one model: its thread count is the server's
    served = open_model(run_dir, cfg.variant, cfg.threads)
    app = create_app(served, cfg)
    # uvicorn installs the SIGTERM and SIGINT handlers that drain (the timeout bounds the drain),
    # then raises the signal again for the handler that was there before: the default one would
    # end a server that drained cleanly with -15, so a no-op stands in and it exits 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(
        app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=math.ceil(cfg.timeout_s)
    )


def check_address(host: str, port: int) -> None:
    """Refuse, naming it, an address this process cannot listen on (uvicorn would log it and exit 3)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ForgeError(
                f"--host {host} --port {port}: cannot listen there ({err.strerror}); "
                "choose another port, or stop what holds it"
            ) from None
