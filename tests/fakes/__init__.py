"""Fake servers the tests start on 127.0.0.1, behaving like the real APIs (see REFERENCE.md)."""
