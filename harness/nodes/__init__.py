"""Nodes: the agent every node runs, its roles, and the cluster that starts them."""
