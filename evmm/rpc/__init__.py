"""evmm's RPC wire format and the one server core under every socket that speaks it.

``protocol``: length-prefixed msgpack frames carrying requests, responses and events, with no I/O.  The
control channel (``evmm/control``) and the in-guest agent's protocol share it.
"""
