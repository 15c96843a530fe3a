"""`bitnet serve`: an OpenAI-compatible HTTP server over the batched C engine (the `serve` extra)."""
