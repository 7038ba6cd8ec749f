"""Durable asynchronous jobs: store, runner, batch lane, webhooks."""
