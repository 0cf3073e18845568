"""Commands out to the Journeys API: the dispatcher, its own process, the HTTP client."""
