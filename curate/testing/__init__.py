"""Sample generators for tests, benchmarks and the demo: every source layout in miniature, and
defects planted into real normal images."""
