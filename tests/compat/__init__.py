"""The compatibility matrix: the built wheel in a user's environment, with the user's MCP SDK."""
