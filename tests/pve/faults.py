"""Fault injection and the request log.

A fault fires on the Nth request matching METHOD and a regex searched in the API path (without
/api2/json): answer an HTTP error, hang past the client's timeout, or let the call succeed but make the
task it starts end with an error exitstatus.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Request:
    """One request as the emulator received it: the log tests assert on."""

    method: str
    path: str
    params: dict[str, Any]
    status: int = 0


@dataclass
class Fault:
    method: str
    path: str  # regex, searched
    kind: str  # "error" | "hang" | "task"
    nth: int = 1
    status: int = 500
    message: str = "injected failure"
    seconds: float = 30.0
    seen: int = 0
    fired: bool = False

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and re.search(self.path, path) is not None


@dataclass
class Faults:
    faults: list[Fault] = field(default_factory=list)

    def add(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def take(self, method: str, path: str) -> Fault | None:
        """The fault this request triggers (each fires once, on its Nth match), or None."""
        chosen = None
        for fault in self.faults:
            if fault.fired or not fault.matches(method, path):
                continue
            fault.seen += 1
            if fault.seen == fault.nth and chosen is None:
                fault.fired = True
                chosen = fault
        return chosen
