"""The gRPC servers (model service, store service) and what they share (auth, errors, health,
TLS, graceful shutdown), the Python client, and the Ray pipeline."""
