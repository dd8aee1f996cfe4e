"""The audit stage: what is wrong with the data before anything trains on it."""
