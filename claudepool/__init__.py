"""claudepool: a multi-tenant pool of warm Claude Code CLI processes behind one daemon."""

__version__ = "0.1.0"
