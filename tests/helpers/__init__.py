"""What several test files share: fixture data builders, small configs and launch helpers. The
fixtures themselves (pytest's) live in tests/conftest.py."""
