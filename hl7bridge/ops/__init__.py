"""Running the service: health endpoint, Prometheus metrics, systemd notification."""
