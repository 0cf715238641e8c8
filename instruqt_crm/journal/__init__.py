"""What the service writes down for operators: failures, learners' trails, counters.

Every stage writes here (the receiver, the engine, the CRM adapters); ``ops`` and the
operator pages read it back.
"""
