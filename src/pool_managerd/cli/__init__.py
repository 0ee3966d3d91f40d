"""The ``pool-managerd`` commands: one module per subcommand, the dispatcher in :mod:`.main`,
what they print alike in :mod:`.format` and how they reach NATS in :mod:`.connect`. A command
imports those two, never another command."""
