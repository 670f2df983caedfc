"""The OAO worker: claims nodes from Redis and runs each agent as a governed step loop."""
