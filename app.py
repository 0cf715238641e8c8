"""Web entry for gunicorn (Procfile ``web``)."""

from instruqt_crm.receiver import create_app

app = create_app()
