"""A local, Stella-compatible backend: media API, Convex sync protocol, file serving.

It is what ``materializer demo`` runs on and what the tests run against. It
must be faithful enough that the official Convex clients work against it
unchanged. Start it with ``materializer dev-backend``; drive it from Python
with :class:`materializer.devbackend.control.DevBackend`.
"""
