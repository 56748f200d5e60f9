"""The benchmark: real servers, a Node load generator, scenarios, a report (README.md)."""
