"""Stage 5, fleet reports: the MQTT bridge and the ingest writer of device reports."""
