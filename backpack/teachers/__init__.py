"""Teacher backends behind one protocol (see `base.py`)."""

from backpack.teachers.base import Teacher
from backpack.teachers.host import build_teacher

__all__ = ["Teacher", "build_teacher"]
