"""Issue #16's acceptance checks, each a script with a pass/fail exit code (docs/testing.md,
"Acceptance runs"). Run from the repository root, where ``tests`` is a (namespace) package:

    .venv/bin/python -m tests.acceptance.check_load ARTIFACT

``tests/test_acceptance.py`` runs a short version of each the same way.
"""
