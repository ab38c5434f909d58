"""The suite: test_*.py files, their fixtures and tiers (conftest.py), and what they share (support/)."""
import sys

if "pytest" in sys.modules:  # not when a connector run or a benchmark imports a helper
    import pytest

    # Before any helper is imported: an assert in tests/support/ explains its failure as one in a test file does.
    pytest.register_assert_rewrite("tests.support")
