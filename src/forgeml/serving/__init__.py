"""forgeml serve: a run's model behind an HTTP API."""
