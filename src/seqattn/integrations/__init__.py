"""Integrations with other libraries (imported on demand: they need those libraries)."""
