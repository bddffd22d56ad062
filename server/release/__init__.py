"""Stage 3, release: the root of trust, signing, the artifact store, signed targeting."""
