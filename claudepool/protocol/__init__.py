"""Typed models of every line we read or write: the CLI's stream-json and our client frames."""
