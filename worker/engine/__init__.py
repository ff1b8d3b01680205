"""The generation engine: a pure function of (model, tokenizer, requests, config) -> generations.

It imports neither Celery, Redis, SQLAlchemy nor ``lmjobs.db`` (an import contract in CI
holds this). ``core.generate`` is the entry point; the other modules are its parts.
"""
