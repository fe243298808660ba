"""Test doubles that ship with dallm because other processes load them: a fake training engine
(`fake_engine.train`, run by daemon workers in tests and benchmarks) and an in-memory daemon for the
TUI (`FakeConnection`, also behind `dallm-tui --demo`). Both use the real protocol types."""
