"""lifecycle package."""
