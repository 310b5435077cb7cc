"""What an API key may do. `admin` implies `write` implies `read`."""

from __future__ import annotations

from enum import StrEnum


class Scope(StrEnum):
    read = "read"  # verify, identify, list/read identities, embed
    write = "write"  # enrol, add/delete faces and identities
    admin = "admin"  # calibrate, keys, evaluation on the live gallery

    def implies(self, other: Scope) -> bool:
        order = [Scope.read, Scope.write, Scope.admin]
        return order.index(self) >= order.index(other)
