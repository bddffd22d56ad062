"""The ``edgeloop`` operator CLI, one module per command group."""
