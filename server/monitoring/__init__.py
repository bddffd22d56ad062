"""Label-free drift monitoring: pure statistics, and the shell that feeds them and acts.

Pure (nothing touches a database, the network or a clock, nothing imports ``server.*`` beyond
these modules; ``tests/server/test_package_layout.py`` checks it): the modules take reference
and window histograms (``contract.monitoring``), numbers and states, and return scores,
estimates and state transitions.

- :mod:`server.monitoring.drift`: PSI and Jensen-Shannon per signal, with each threshold
  calibrated to the window's sample count by resampling the reference, Bonferroni-corrected over
  the signals; one verdict per window.
- :mod:`server.monitoring.estimate`: expected accuracy without labels from the confidence
  histogram and the holdout calibration (in the manner of NannyML's CBPE), and live accuracy
  where labels exist.
- :mod:`server.monitoring.rules`: alert rules with hysteresis (k breaching windows to raise,
  m clean ones to clear).

Stateful (the database, the artifact store, HTTP, a clock; each injected):

- :mod:`server.monitoring.references`: each version's reference, read once from its ONNX
  metadata, its calibrated thresholds, and the check a device summary must pass at ingest.
- :mod:`server.monitoring.windows`: a closed window's summaries and metrics reports merged per
  (version, device group) and turned into figures.
- :mod:`server.monitoring.alerts`: the rules advanced over those figures, alerts raised and
  cleared, webhook deliveries queued, the retraining hook called.
- :mod:`server.monitoring.evaluator`: the background loop, one writer of alert state.
- :mod:`server.monitoring.webhook`: the outbox sender (JSON POST, retried with backoff).
- :mod:`server.monitoring.capture`: the signed capture policies of drifting device groups
  (issued while an alert holds, the default when it clears), recorded and published retained.

Exception tree::

    MonitoringError       (inputs do not fit: bins differ, empty reference, bad parameter)
    └── NoReferenceError  (a model version has no usable reference: its traffic is not scored)
"""

from server.monitoring._errors import MonitoringError, NoReferenceError

__all__ = ["MonitoringError", "NoReferenceError"]
