"""Peer servers on the same model and weights, exposing the endpoints the load generator uses."""
