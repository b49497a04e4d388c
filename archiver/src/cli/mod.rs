//! The `coffer` command-line client.
