"""Forwarding: the delivery queue, the outcome policy and the workers that send to PACS."""
