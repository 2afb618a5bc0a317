"""Exporters: write a manifest out in the layouts other tools read."""
