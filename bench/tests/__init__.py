"""The benchmark's tests (run from the repository root: pytest bench/tests)."""
