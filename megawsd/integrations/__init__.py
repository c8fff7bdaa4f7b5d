"""megawsd.integrations."""
