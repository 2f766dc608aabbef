"""The atlasflow command line: up, down, demo, send, convert (a client of the public APIs)."""
