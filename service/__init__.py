"""Serving side of rmserve: gateway, queue, worker, configuration and CLI."""
