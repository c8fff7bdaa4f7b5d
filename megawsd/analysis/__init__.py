"""megawsd.analysis."""
