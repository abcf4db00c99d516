"""The entropy laboratory: tiny models and tasks built locally."""
