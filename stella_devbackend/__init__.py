"""A local, Stella-compatible backend: media API, Convex sync protocol, token endpoint, file serving.

It is what ``materializer demo`` runs on and what the tests run against. By
default it behaves like the real systems (a Convex deployment running the
Stella backend), each rule citing the source it mirrors; the official
Convex clients (Python and npm) work against it unchanged. Additions the
real systems lack are off unless switched on (``--extension``), and
misbehaviour only comes from faults (:mod:`stella_devbackend.faults`).
Start it with ``materializer dev-backend`` or ``python -m stella_devbackend``
(flags: :mod:`stella_devbackend.options`); drive it from Python with
:class:`stella_devbackend.control.DevBackend`.

It is a package of its own beside the product (``materializer``), in the
same distribution; what it needs beyond the product's dependencies
(aiohttp) comes with the ``backend`` extra. It signs and verifies its own tokens
(:mod:`stella_devbackend.jwt`). The product never imports it at module
level: the CLI reads :mod:`stella_devbackend.options` (standard library
only) to describe ``dev-backend``, and starts the backend only when asked.
"""
