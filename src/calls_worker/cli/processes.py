"""The long-running processes: ``run`` (everything, for a newcomer), ``worker``, ``beat``
and ``flower`` (each on its own, as a deployment runs them), and how they log."""

from __future__ import annotations

import sys
from typing import Any, get_args

import click

from calls_worker.cli.params import PORT, POSITIVE, TEXT, Address, Module, Queues
from calls_worker.cli.servers import celery_app, configured
from calls_worker.config import LogFormat, LogLevel

log_format_option = click.option(
    "--log-format",
    type=click.Choice(get_args(LogFormat)),
    default=None,
    help="text for people, json (one object a line) for machines.  [default:"
    " CALLS_WORKER_LOG_FORMAT, else text]",
)
log_level_option = click.option(
    "--loglevel",
    "-l",
    "log_level",
    type=click.Choice(get_args(get_args(LogLevel)[0]), case_sensitive=False),
    default=None,
    help="What to log.  [default: CALLS_WORKER_LOG_LEVEL, else INFO]",
)


def _logging(settings: Any, log_format: str | None, log_level: str | None) -> tuple[Any, Any]:
    """The format and level: the option's, else the setting's."""
    return log_format or settings.log_format, (log_level or settings.log_level).upper()


@click.command()
@log_format_option
@log_level_option
@click.option("--flower", is_flag=True, help="Also run Flower on 127.0.0.1.")
@click.option("--flower-port", type=PORT, default=5555, show_default=True)
def run(log_format: LogFormat | None, log_level: LogLevel | None, flower: bool,
        flower_port: int) -> None:  # fmt: skip
    """Migrate, then run a worker and beat until Ctrl-C (embedded servers if no URLs)."""
    from calls_worker.cli.supervisor import run_everything, sole_run

    servers = configured()
    log_format, log_level = _logging(servers.settings, log_format, log_level)
    with sole_run(servers.settings.data_dir):
        status = run_everything(
            servers, log_format=log_format, log_level=log_level,
            flower_port=flower_port if flower else None,
        )  # fmt: skip
    sys.exit(status)


@click.command()
@log_format_option
@log_level_option
@click.option("--queues", "-Q", type=Queues(),
              default="calls.commands,calls.sweeps", show_default=True)
@click.option("--concurrency", "-c", type=POSITIVE, default=None,
              help="Processes (default: cores).")
@click.option("--hostname", "-n", type=TEXT, default=None, help="Worker name, e.g. commands@%h.")
@click.option("--include", "-I", type=Module(), multiple=True,
              help="Also import this module (Celery's --include).")  # fmt: skip
def worker(
    log_format: LogFormat | None,
    log_level: LogLevel | None,
    queues: str,
    concurrency: int | None,
    hostname: str | None,
    include: tuple[str, ...],
) -> None:
    """Run a Celery worker consuming the command and sweep queues."""
    servers = configured()
    log_format, log_level = _logging(servers.settings, log_format, log_level)
    if servers.settings.metrics_port:
        from calls_worker.worker.metrics import prepare_multiprocess_dir

        prepare_multiprocess_dir()
    argv = ["worker", "--loglevel", log_level, "--queues", queues, "--without-mingle"]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    if hostname:
        argv += ["--hostname", hostname]
    for module in include:
        argv += ["--include", module]
    try:
        celery_app(servers, log_format).worker_main(argv)
    finally:
        servers.stop()


@click.command()
@log_format_option
@log_level_option
def beat(log_format: LogFormat | None, log_level: LogLevel | None) -> None:
    """Run Celery beat: the sweep every CALLS_WORKER_SWEEP_INTERVAL_SECONDS. Run one only."""
    servers = configured()
    log_format, log_level = _logging(servers.settings, log_format, log_level)
    servers.settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        celery_app(servers, log_format).start(["beat", "--loglevel", log_level])
    finally:
        servers.stop()


@click.command()
@click.option("--address", type=Address(), default="127.0.0.1", show_default=True)
@click.option("--port", type=PORT, default=5555, show_default=True)
def flower(address: str, port: int) -> None:
    """Run Flower, the task dashboard (requires CALLS_WORKER_FLOWER_BASIC_AUTH)."""
    from calls_worker.cli.flower import require_auth, run_flower

    servers = configured()
    auth = servers.settings.flower_basic_auth
    basic_auth = require_auth(auth.get_secret_value() if auth else None)
    try:
        run_flower(celery_app(servers), basic_auth, address, port)
    finally:
        servers.stop()


COMMANDS: list[Any] = [run, worker, beat, flower]
