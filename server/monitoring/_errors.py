"""Exception family of monitoring (see the tree in ``server.monitoring``)."""


class MonitoringError(ValueError):
    """Inputs to a statistic do not fit together (bins differ, an empty reference, a bad
    parameter). A programming or data error: retrying the same inputs cannot help."""


class NoReferenceError(MonitoringError):
    """A model version has no usable monitoring reference (no such version, no model file, no
    reference in its metadata, or one that does not parse): its traffic cannot be scored."""
