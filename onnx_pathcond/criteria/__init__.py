"""Criteria: what the rescaling optimises. Each builds a `Problem` for the solver."""
