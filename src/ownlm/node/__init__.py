"""The node: a received bundle is verified, opened, checked and installed atomically, and routed to its user;
rollback, pruning and start-up recovery (install)."""
