"""Stage 2, retrain: the training job queue and runner, schedules, line config, lineage."""
