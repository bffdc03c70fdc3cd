"""The HTTP layer: thin routes, dependencies, error envelope, request-size limits."""
