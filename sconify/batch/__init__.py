"""Batch conversion: many images with one command, on a local pool of worker processes or on Celery workers.

``jobs`` reads JOBS.yaml and keys each job; ``store`` keeps jobs durably (SQLite); ``runner`` runs one job and
the local pool; ``celery_app`` runs the same jobs on Celery with a Redis broker; ``report`` collects outcomes;
``sharing`` lets the jobs share per-layer work. See docs/batch.md.
"""
