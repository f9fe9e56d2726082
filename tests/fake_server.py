"""The fault-injecting fake OpenAI-compatible server now lives in :mod:`evalhost.testing_server` (for plugin
authors too; :class:`evalhost.testing.FakeServer` starts it). This shim keeps ``python tests/fake_server.py ...``
working for the tests that start it by path; the options are those of ``python -m evalhost.testing_server``."""
from __future__ import annotations

from evalhost.testing_server import main

if __name__ == "__main__":
    main()
