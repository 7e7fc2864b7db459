"""Authentication: subscriber token verification (tokens) and the subscribe rules
(claims); the control tokens' grants (grants).

The claims module is pure (no I/O); tokens.py fetches a JWKS document, its only
I/O; grants.py reads the control token files once, at load.
"""
