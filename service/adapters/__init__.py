"""Adapters to other libraries' private parts, each checked at start-up, with a fallback."""
