"""Stage 1, intake: field samples uploaded by devices, their limits and screening."""
