"""A Convex sync-protocol client: values, a sans-I/O protocol core, transports."""
