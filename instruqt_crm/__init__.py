"""instruqt-crm: Instruqt learner activity (Svix webhooks) into HubSpot or Salesforce."""

__version__ = "0.1.0"
