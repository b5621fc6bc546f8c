"""The deployable Fly app: the demo MCP server that ``fly deploy`` ships (``uvicorn app.main:app``)."""
