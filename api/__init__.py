"""The HTTP API that ``lmjobs serve`` runs: OpenAI's Files and Batches endpoints over lmjobs jobs."""
