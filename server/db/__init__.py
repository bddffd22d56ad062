"""Storage: the engine, the ORM tables and the queries shared by the stages, one module per area."""
