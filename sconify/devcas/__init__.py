"""A development CAS for simulation mode (``sconify cas serve``): stores sessions, generates their secrets and hands
a service its configuration when it presents an allowed measurement. Never for production: it cannot attest."""
