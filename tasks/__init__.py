"""Celery glue: the app, the generate_video task (never imports Flask)."""
