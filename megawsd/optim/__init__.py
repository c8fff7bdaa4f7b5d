"""megawsd.optim."""
