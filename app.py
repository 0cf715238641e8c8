"""Web entry for gunicorn (Procfile ``web``)."""

from instruqt_crm.web import create_app

app = create_app()
