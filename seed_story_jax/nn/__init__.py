"""Shared building blocks: the one attention function, logical-axis parameters, norms, position tables."""
