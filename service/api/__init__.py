"""The REST API (FastAPI): reads the service's own tables."""
