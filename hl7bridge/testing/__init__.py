"""Stand-ins for the Journeys API for tests and trials, shipped for users (as treq ships treq.testing)."""
