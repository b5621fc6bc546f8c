"""fly-replay-router: session affinity for stateful MCP servers on Fly Machines."""
