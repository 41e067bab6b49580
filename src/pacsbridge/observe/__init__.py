"""Observation: logging now; delivery status and metrics as forwarding lands."""
