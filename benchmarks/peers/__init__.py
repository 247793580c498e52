"""Peer baselines: other fanout libraries, measured on the same machine in the same run."""
