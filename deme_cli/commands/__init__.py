"""One module per subcommand, plus the pipeline (`deme run`) and the launcher: each turns a recipe into calls of
the engine. Commands never import each other; only the pipeline and the launcher call commands."""
