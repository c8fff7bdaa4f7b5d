"""megawsd.data."""
