"""The service: HTTP API (FastAPI), Redis job queue, client and CLI around ``compute``."""
