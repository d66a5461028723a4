"""gRPC servers and what they share (auth, health, TLS, graceful shutdown)."""
