"""pool-managerd: a per-host daemon that owns GPU inference engines, driven over NATS."""

__version__ = "0.1.0"
