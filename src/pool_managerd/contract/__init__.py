"""The wire contract: messages, subjects, bounds, typed errors and the nats-server floor.

Depends on msgspec and the standard library only; every other layer may import it.
"""
