"""Click subcommands of ``spkserve`` (one module per family)."""
