"""The baseline job: one per event, as before the inbox; does nothing (kept import-free)."""


def noop(message_id: str, body: dict) -> None:
    """Do nothing: measures what RQ itself costs per job."""
