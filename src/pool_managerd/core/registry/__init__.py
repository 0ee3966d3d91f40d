"""core.registry package."""
