"""The `autoshard` subcommands that stand in modules of their own (`autoshard.cli` registers them)."""
