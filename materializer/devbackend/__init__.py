"""A local, Stella-compatible backend: media API, Convex sync protocol, token endpoint, file serving.

It is what ``materializer demo`` runs on and what the tests run against. By
default it behaves like the real systems (a Convex deployment running the
Stella backend), each rule citing the source it mirrors; the official
Convex clients (Python and npm) work against it unchanged. Additions the
real systems lack are off unless switched on (``--extension``), and
misbehaviour only comes from faults (:mod:`materializer.devbackend.faults`).
Start it with ``materializer dev-backend`` or ``python -m
materializer.devbackend`` (flags: :mod:`materializer.devbackend.options`);
drive it from Python with :class:`materializer.devbackend.control.DevBackend`.
"""
