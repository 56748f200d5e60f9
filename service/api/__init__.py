"""FastAPI routes: WebSocket endpoints, HTTP publish, health, metrics and the demo page."""
