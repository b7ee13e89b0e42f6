"""A minimal cpbench plugin: copy this package to start your own."""
