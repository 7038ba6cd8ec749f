"""The gateway between the workers and the provider: the one path a model call takes."""
