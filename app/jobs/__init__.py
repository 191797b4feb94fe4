"""The job protocol shared by the API and the workers: settings, the tensor codec, the Redis
layout and its atomic scripts, the error table and the metrics.

Nothing here imports the API (``app.api``) or the workers; ``app.jobs.codec`` and
``app.jobs.errors`` are light enough for the client and the CLI.
"""
