"""One module per method: its claim check(s), registered on import."""
