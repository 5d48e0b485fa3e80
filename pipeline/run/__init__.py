"""A run: the dispatcher, the worker pool, pacing, retries, outages, stopping, and the run's counters."""
