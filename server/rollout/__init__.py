"""Stage 4, rollout: pure decisions (plan, gates, decide) and the engine that applies them."""
