"""The applications on the engine and its serving layer: the `soprano` command line, the
OpenAI-compatible HTTP server and the web UI, with the options they share (`options`)."""
