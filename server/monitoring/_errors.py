"""Exception family of the monitoring statistics (see the tree in ``server.monitoring``)."""


class MonitoringError(ValueError):
    """Inputs to a statistic do not fit together (bins differ, an empty reference, a bad
    parameter). A programming or data error: retrying the same inputs cannot help."""
