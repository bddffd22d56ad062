"""``edgeloop worker``: train queued jobs on this machine (a GPU box, a batch node).

The worker reads its settings from the same ``EDGELOOP_*`` variables as the server: it needs the
database (``EDGELOOP_DATABASE_URL``), the artifact store every server reads
(``EDGELOOP_ARTIFACT_STORE_URL``: a ``file:///dir`` every machine mounts, or ``s3://bucket``), a
scratch directory (``EDGELOOP_DATA_DIR/jobs``) and the training extra
(``pip install 'edgeloop[worker]'``). It never needs the signing key: the servers register, sign
and roll out what it trained. SIGTERM or Ctrl-C stops the trainer and puts its job back in the
queue; a SIGKILL does too, once the lease expires.
"""

from __future__ import annotations

import logging
import signal
from typing import Annotated

import typer

from server.cli.base import err_console
from server.core.config import Settings
from server.core.errors import ConfigError
from server.db.engine import make_engine, make_sessionmaker
from server.db.migrate import require_current
from server.release.artifacts import open_artifact_store
from server.retrain.worker import TrainingWorker

log = logging.getLogger(__name__)


def worker(
    once: Annotated[
        bool, typer.Option("--once", help="Train one job (waiting for it), then exit.")
    ] = False,
    max_jobs: Annotated[
        int, typer.Option("--max-jobs", min=0, help="Exit after this many jobs (0: never).")
    ] = 0,
) -> None:
    """Claim training jobs from the database, train them, hand the results back."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = Settings()
    engine = make_engine(settings.database_url)
    try:
        require_current(engine)
    except ConfigError as exc:
        engine.dispose()
        err_console.print(f"edgeloop worker refuses to start: {exc.message}", markup=False)
        raise typer.Exit(2) from exc
    try:
        store = open_artifact_store(settings)
    except ConfigError as exc:
        engine.dispose()
        err_console.print(f"edgeloop worker refuses to start: {exc.message}", markup=False)
        raise typer.Exit(2) from exc
    training = TrainingWorker(settings=settings, sessions=make_sessionmaker(engine), store=store)

    def stop(signum: int, _frame: object) -> None:
        log.warning("signal %d: stopping (a running job goes back to the queue)", signum)
        training.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info(
        "training worker %s on %s, artifacts in %s",
        training.identity,
        engine.url.render_as_string(hide_password=True),
        store.url,
    )
    try:
        ran = training.serve(max_jobs=1 if once else (max_jobs or None))
    finally:
        engine.dispose()
    log.info("training worker %s: %d job(s) run", training.identity, ran)
