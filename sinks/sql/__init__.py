"""SQL migrations of the sinks (package data; a package so wheels ship the files)."""
