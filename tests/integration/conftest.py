"""The integration tier: its session fixtures (`stack`, `prefect_client`) live in
tests/conftest.py, shared with tests/drills/."""
