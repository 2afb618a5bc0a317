"""Stages: each reads a manifest and writes a new one (see curate.runner)."""
