"""The affinity layer: session tokens, the routing decision, and the ASGI middleware."""
