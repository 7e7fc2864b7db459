"""Subscriber authentication: token verification (tokens) and the subscribe rules (claims).

The claims module is pure (no I/O); tokens.py fetches a JWKS document, its only I/O.
"""
