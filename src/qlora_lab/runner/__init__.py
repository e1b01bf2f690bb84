"""Runs and sweeps: validate, resolve the run spec, call the stages in order, record how it ended."""
