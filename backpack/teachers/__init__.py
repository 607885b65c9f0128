"""Teacher backends behind one protocol (see `base.py`)."""

from backpack.teachers.base import Teacher, build_teacher

__all__ = ["Teacher", "build_teacher"]
