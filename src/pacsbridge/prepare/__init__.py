"""Prepare instances for one PACS: compression, monochrome, time zone, character set, repairs."""
