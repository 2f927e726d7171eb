"""The adapter that talks to the Prefect server."""
