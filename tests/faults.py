"""Simulated crashes for the tests of outputs that must appear whole."""

from __future__ import annotations


def kill_after_first_move(monkeypatch) -> None:
    """`atomic_outputs.publish` dies (as if killed) after moving its first file into place."""
    from dialogrl.data import atomic_outputs

    moved = []
    real_move = atomic_outputs._move

    def move(source, target):
        if moved:
            raise KeyboardInterrupt("killed")
        moved.append(target)
        real_move(source, target)

    monkeypatch.setattr(atomic_outputs, "_move", move)
