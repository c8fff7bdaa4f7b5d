"""megawsd.train."""
