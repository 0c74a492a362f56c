"""The one error type users see: a one-line message naming the problem, exit code 2."""
from __future__ import annotations

from workloads.errors import InputError


class UserError(InputError):
    """Bad input found by the orchestrator; workloads raise the base class InputError. Bad input (config,
    data, budgets, files). The CLI prints ``error: <message>`` and exits 2."""

    exit_code = 2
