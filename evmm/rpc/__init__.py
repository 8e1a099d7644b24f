"""evmm's RPC layer: wire formats, the one server core under every socket, and the client side of a stream.

``protocol``: length-prefixed msgpack frames carrying requests, responses and events, with no I/O; the control
channel (``evmm/control``) and the in-guest agent's protocol share it.  ``codec``: what the server needs of a
wire format, and the msgpack one; ``qmp_wire``: QMP's JSON stream as another.  ``server``: ``RpcServer``, a Unix
socket serving one codec and one handler.  ``connection``: ``Connection``, the client side of msgpack frames.
"""
