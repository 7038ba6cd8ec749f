"""Test aids shipped with the package: a loopback fake of the Anthropic Messages API.

Used by claudepool's own tests and benchmarks, by ``claudepool serve --dev`` when no upstream is
configured, and available to users who test their integrations without a network.
"""
