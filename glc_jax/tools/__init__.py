"""Command-line tools (weight import)."""
