"""The edgeloop server: registry, sample intake, training jobs, signing and staged rollouts.

Build an application with ``server.main.create_app(settings)``; nothing is created at import time.

One package per stage of the loop (intake -> retrain -> release -> rollout -> fleet reports),
each importing only the packages below it or to the right of its arrow (checked by
``tests/server/test_package_layout.py``)::

    main       the app factory ──▶ api (routes, deps, schemas, metrics) ──▶ services
    services   the composition root: builds and wires the stages
    cli        the operator CLI (an HTTP client; keys, broker and audit work locally)
    ─────────
    fleet      MQTT bridge, ingest of device reports ──▶ rollout (members' reported states)
    intake     samples, screening, upload limits     ──▶ rollout (is a rollout active?)
    rollout    plan, gates, decide | engine, members ──▶ release (each rollout's release)
    retrain    job queue runner, registration        ──▶ release (the artifact store)
    release    root of trust, signing, targeting, artifact store, export
    identity   operators, enrollment, broker ACL
    ─────────
    db         tables and their queries, one module per area
    core       settings, errors, background workers
"""
