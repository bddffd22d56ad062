"""Label-free drift monitoring: the pure statistics behind the server's drift alerts.

Nothing here touches a database, the network or a clock, and nothing imports ``server.*``: the
modules take reference and window histograms (``contract.monitoring``), numbers and states, and
return scores, estimates and state transitions. The server's ingest, storage, API and alert
delivery feed them.

- :mod:`server.monitoring.drift`: PSI and Jensen-Shannon per signal, with each threshold
  calibrated to the window's sample count by resampling the reference, Bonferroni-corrected over
  the signals; one verdict per window.
- :mod:`server.monitoring.estimate`: expected accuracy without labels from the confidence
  histogram and the holdout calibration (in the manner of NannyML's CBPE), and live accuracy
  where labels exist.
- :mod:`server.monitoring.rules`: alert rules with hysteresis (k breaching windows to raise,
  m clean ones to clear).

Exception tree::

    MonitoringError   (inputs do not fit: bins differ, empty reference, bad parameter)
"""

from server.monitoring._errors import MonitoringError

__all__ = ["MonitoringError"]
