"""The OpenAI-compatible HTTP server: the app, its output formatting and its Prometheus metrics."""
