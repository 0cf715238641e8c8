"""Fake servers the tests start on 127.0.0.1, behaving as the vendors document their APIs."""
