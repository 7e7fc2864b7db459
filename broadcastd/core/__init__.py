"""Pure logic: no sockets, no event loop, no clock it is not handed, no metrics.

Everything here is driven by the adapters in broadcastd.transport and can be
unit-tested with plain function calls.
"""
