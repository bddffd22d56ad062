"""Infrastructure every stage uses: settings, the exception family, background workers."""
