"""Reconciliation: what claudepool billed, call by call, against what the provider says it served.

``claudepool reconcile --since DATE --until DATE`` reads the daemon's per-call ledger (`ledger`: over
``GET /v1/ledger`` or from the ledger file) and the organisation's usage and cost reports (`provider`:
the Usage & Cost Admin API, with ``[upstream] admin_key``), sums both per UTC day and model, and
prints the differences in tokens of each kind and in dollars (`compare`, pure functions); `command`
is the command line. A difference need not be a call billed wrong, and some it cannot see at all:

- the provider's report lag: a call appears in its reports some time after it ended (minutes, at
  times hours), so today's last calls may show as ledger-only for a while; reconcile past days, or
  run it again;
- a call cut mid-stream (an interrupt, a client gone) is billed with the usage its stream had
  reported when it was cut; the provider bills what it generated, which may be more output than the
  stream had counted, so cut calls can show as a small positive output difference;
- calls near midnight: a call counts on the day it began on both sides (the ledger's ``at`` less
  its duration), but the two clocks and the network latency differ, so a call begun within that
  margin of midnight may count on the next day at the provider;
- who else spends the organisation's money: other tools and keys, or daemons whose ledger is not
  read here, show as provider-only usage (the traffic a reconciliation exists to find, but it cannot
  tell it from a call the gateway failed to bill); a profile whose ``[upstream.profiles.NAME]`` key
  belongs to another organisation shows as ledger-only;
- records the daemon's ledger no longer holds (``store.ledger_max_records``): read the ledger file;
- turn records (``kind="turn"``, a turn the gateway saw no call of): counted, not compared;
- costs that are not a model's tokens (web search, code execution) are provider-only.
"""
