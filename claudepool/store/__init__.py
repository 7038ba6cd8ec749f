"""Where limits, budgets and usage live: in memory (one daemon) or in Redis (several daemons)."""
