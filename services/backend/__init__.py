"""The backend node: a work service that fails on purpose (faults, simulation, control)."""
