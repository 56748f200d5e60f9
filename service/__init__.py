"""A horizontally scalable WebSocket broadcast service on FastAPI, broadcaster and Redis."""

__version__ = "0.1.0"
