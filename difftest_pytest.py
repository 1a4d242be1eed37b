"""pytest plugin of difftest (registered under the pytest11 entry point)."""
