"""legacy-sim: the project's fake of the legacy registration adaptation layer."""
