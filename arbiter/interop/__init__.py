"""Interop with other interpretability libraries (nnsight: ``arbiter.interop.nnsight``)."""
