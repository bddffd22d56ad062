"""The ``edgeloop`` operator CLI: talks to the server over HTTP; one module per command group.

edgeloop --server URL devices list
edgeloop --token $EDGELOOP_TOKEN rollouts approve 3   # who approves: the token's operator
edgeloop tokens create --name alice --role approver    # admin: a token, printed once
edgeloop devices enroll-token --uses 50                # operator: a bootstrap token
edgeloop devices revoke cam-7
edgeloop broker write-config --out ./broker            # passwd + acl from the database
edgeloop models show digits 3            # metrics and the gate report
edgeloop models alias digits champion
edgeloop lineage model digits 3          # model -> dataset -> samples -> devices
edgeloop lineage sample SAMPLE_ID        # sample -> datasets -> models
edgeloop keys init ./keys
edgeloop releases export digits 7 ./bundle   # for `edgeloop-agent install ./bundle` offline
edgeloop db upgrade                      # the database to this edgeloop's schema (servers stopped)
edgeloop alerts list --line digits --state raised
edgeloop alerts show 4                   # the figures that raised it, its training, webhook
edgeloop worker                          # train queued jobs here (reads EDGELOOP_* like the server)
edgeloop artifacts gc --older-than 7     # unreferenced store objects (dry run; --apply deletes)
"""

from __future__ import annotations

from typing import Annotated

import typer

from server.cli import (
    alerts,
    artifacts,
    audit,
    auth,
    base,
    db,
    devices,
    jobs,
    keys,
    labels,
    lineage,
    models,
    releases,
    rollouts,
    worker,
)

app = typer.Typer(help="Operate an edgeloop server.", no_args_is_help=True)


@app.callback()
def _main(
    server: Annotated[
        str,
        typer.Option(
            "--server", envvar="EDGELOOP_SERVER_URL", help="Base URL of the edgeloop server."
        ),
    ] = "http://127.0.0.1:8000",
    token: Annotated[
        str,
        typer.Option("--token", envvar="EDGELOOP_TOKEN", help="Operator bearer token."),
    ] = "",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print listings as JSON (for scripts), not tables.")
    ] = False,
) -> None:
    base.state.server = server.rstrip("/")
    base.state.token = token
    base.state.json = as_json


for group, name in (
    (devices.app, "devices"),
    (models.app, "models"),
    (rollouts.app, "rollouts"),
    (jobs.app, "jobs"),
    (keys.app, "keys"),
    (lineage.app, "lineage"),
    (releases.app, "releases"),
    (alerts.app, "alerts"),
    (labels.app, "labels"),
    (auth.tokens_app, "tokens"),
    (auth.broker_app, "broker"),
):
    app.add_typer(group, name=name)
app.command("whoami")(auth.whoami)
app.command("worker")(worker.worker)
app.add_typer(audit.audit_app, name="audit")
app.add_typer(audit.samples_app, name="samples")
app.add_typer(db.db_app, name="db")
app.add_typer(artifacts.artifacts_app, name="artifacts")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
