"""The Celery side: app, wire format, messages, error policy, the three tasks, workers."""
