"""The long-running service: config, front ends, lifecycle, systemd integration."""
