"""Typed, picklable errors.

Every error a user can cause is a `BackpackError` whose message names the bad value; the CLI prints it as one
line and exits non-zero (2 for bad input). Errors that cross actor boundaries carry plain strings only, so they
pickle through Ray unchanged.
"""

from __future__ import annotations


class BackpackError(Exception):
    """Base class for errors that are shown to the user as one clear message."""

    exit_code = 1


class ConfigError(BackpackError):
    """A run config is invalid. `problems` lists every problem as 'field.path: message'."""

    exit_code = 2

    def __init__(self, source: str, problems: list[str], what: str = "config"):
        self.source = source
        self.problems = list(problems)
        self.what = what
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {what} {source} ({len(self.problems)} problem(s)):\n{lines}")

    def __reduce__(self):
        return (ConfigError, (self.source, self.problems, self.what))


class InputError(BackpackError):
    """Bad user input other than the config: a prompt file, a model path, a dataset path."""

    exit_code = 2


class ModelNotFoundError(InputError):
    """A teacher's model cannot be found or loaded."""


class RedisUnavailableError(BackpackError):
    """Redis cannot be reached, refused the password, or the embedded server failed to start."""

    exit_code = 2


class ResourceError(BackpackError):
    """The Ray cluster cannot place what the config asks for."""

    exit_code = 2


class TeacherError(BackpackError):
    """A teacher failed to answer a batch. Names the teacher and replica and the cause."""

    def __init__(self, teacher: str, cause: str):
        self.teacher = teacher
        self.cause = cause
        super().__init__(f"teacher {teacher!r} failed: {cause}")

    def __reduce__(self):
        return (TeacherError, (self.teacher, self.cause))


class TeacherDeadError(TeacherError):
    """A teacher's engine died and cannot answer again (a vLLM engine core that crashed): the scheduler treats
    the replica as dead, like an actor that died, and re-routes its work."""

    def __reduce__(self):
        return (TeacherDeadError, (self.teacher, self.cause))


class DatasetError(BackpackError):
    """A dataset directory is missing, unreadable or inconsistent."""

    exit_code = 2


def cause_of(err: BaseException) -> str:
    """What went wrong, in one line for a user, for an error that may have crossed Ray.

    Ray carries a remote exception as `cause` (a teacher's, a scheduler's): that one is meant. A BackpackError
    says it all in its message; any other exception is named by its type. An error whose message folds a
    remote traceback (an actor that failed in its constructor, a Ray Train worker) is named by the last line of
    it that names an error: the innermost."""
    inner = getattr(err, "cause", None)
    if isinstance(inner, BaseException):
        err = inner
    if isinstance(err, BackpackError):
        return str(err)
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1:
        named = [line for line in lines if "Error" in line and not line.startswith(("File ", "ray."))]
        if named:
            return named[-1].removeprefix("backpack.errors.")
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
