"""The command-line shell: one thin module per command over the library."""
