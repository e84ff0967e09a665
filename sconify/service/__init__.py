"""The registry-triggered conversion service: registry events in, durable conversion jobs out (``sconify serve``).

``config`` reads and validates ``service.yaml``; ``events`` parses the payloads of the distribution registry,
Harbor, GitHub and Docker Hub; ``auth`` checks each source's credential; ``routes`` maps repositories to
destinations and options; ``app`` is the aiohttp application that only validates, authenticates, routes and
enqueues; ``worker`` runs the conversions in separate processes with retries; ``cas`` uploads policies;
``metrics`` exposes Prometheus metrics.
"""
