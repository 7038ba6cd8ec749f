"""Test aids shipped with the package: a loopback fake of the Anthropic Messages API, and the store
conformance suite.

The fake is used by claudepool's own tests and benchmarks, by ``claudepool serve --dev`` when no
upstream is configured, and is available to users who test their integrations without a network.
The conformance suite (`store_conformance`) is what a new store backend must pass.
"""
