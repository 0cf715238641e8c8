"""The baseline job: same arguments as ``process_event``, does nothing (kept import-free)."""


def noop(message_id: str, body: dict) -> None:
    """Do nothing: measures what RQ itself costs per job."""
