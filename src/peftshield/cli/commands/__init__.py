"""One module per CLI subcommand; each registers itself on :data:`peftshield.cli.app.app`."""
