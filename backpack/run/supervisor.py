"""What a continual run's driver does about its parts, as explicit states and decisions.

Shaped like Ray Train v2's controller: each round the driver looks at its parts and writes what it saw as an
`Observation` (plain data); `Supervisor.decide` turns it into decisions (pure: no Ray, no Redis, no clock); the
driver applies them (`backpack.run.continual`). So every rule of the loop is tested without a cluster:

    RUNNING   a teacher replica the scheduler found dead       -> RespawnTeacher (counted once it is back)
              the scheduler actor ended or died                 -> RestartScheduler (its prompts not stored are
                                                                   delivered again by the intake stream)
              the trainer task ended or failed                  -> RestartTrainer from the last checkpoint, or
                                                                   Fail once it did so MAX_TRAINER_RESTARTS times
              the student server died                           -> RestartServer
              the server answers                                -> ServedVersion (advertised in Redis)
              the stop flag or Ctrl-C                           -> Stop; the state becomes STOPPING
    STOPPING  nothing is restarted (parts end because of the stop); the driver stores what teachers are
              answering, lets the trainer write its last checkpoint and stops everything
    FAILED    the driver stops everything and raises the failure's message
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional, Union

MAX_TRAINER_RESTARTS = 5  # past this many trainer failures the run stops with the last error


class RunState(enum.Enum):
    STARTING = "starting"   # parts are being started; nothing is watched yet
    RUNNING = "running"     # parts are watched and restarted
    STOPPING = "stopping"   # asked to stop: parts that end are not restarted
    FAILED = "failed"       # a part failed past its restarts


@dataclass(frozen=True)
class Ended:
    """A part's task that returned (`ok`, with its `value`) or raised (`error`, one line) since the last look."""
    ok: bool
    value: Any = None
    error: str = ""


@dataclass(frozen=True)
class Observation:
    """What the driver saw of its parts in one look."""
    stop_requested: bool = False
    dead_replicas: tuple[str, ...] = ()   # replicas the scheduler found dead (none when it could not be asked)
    scheduler: Optional[Ended] = None     # None: still running
    trainer: Optional[Ended] = None       # None: still running (value: the step it stopped at)
    server: str = "alive"                 # alive | busy (did not answer in time: loading a version) | dead
    server_version: Optional[int] = None  # the version an alive server serves


@dataclass(frozen=True)
class Stop:
    reason: str


@dataclass(frozen=True)
class RespawnTeacher:
    replica: str


@dataclass(frozen=True)
class RestartScheduler:
    ended: Ended


@dataclass(frozen=True)
class RestartTrainer:
    why: str                  # "ended" | "failed: <cause>"
    step: Optional[int] = None  # where it stopped, when it returned


@dataclass(frozen=True)
class RestartServer:
    pass


@dataclass(frozen=True)
class ServedVersion:
    version: int


@dataclass(frozen=True)
class Fail:
    message: str


Decision = Union[Stop, RespawnTeacher, RestartScheduler, RestartTrainer, RestartServer, ServedVersion, Fail]


@dataclass
class Supervisor:
    """The continual run's state and the rules that decide what to do about what its driver observes."""

    max_trainer_restarts: int = MAX_TRAINER_RESTARTS
    state: RunState = RunState.STARTING
    restarts: dict = field(default_factory=dict)  # part -> times it was started again

    def running(self) -> None:
        """Every part has started: from now on they are watched."""
        if self.state is RunState.STARTING:
            self.state = RunState.RUNNING

    def stopping(self) -> None:
        """The run is being stopped (Ctrl-C, an error): nothing is restarted any more."""
        if self.state is not RunState.FAILED:
            self.state = RunState.STOPPING

    def respawned(self, replica: str) -> None:
        """A dead teacher replica is serving again (a respawn that failed is retried next round, not counted)."""
        self._count("teacher")

    def decide(self, seen: Observation) -> list[Decision]:
        """The decisions for one look at the parts, in the order the driver applies them."""
        if self.state is not RunState.RUNNING:
            return []
        if seen.stop_requested:
            self.state = RunState.STOPPING
            return [Stop("stop requested")]
        out: list[Decision] = [RespawnTeacher(r) for r in seen.dead_replicas]
        if seen.scheduler is not None:
            self._count("scheduler")
            out.append(RestartScheduler(seen.scheduler))
        if seen.trainer is not None:
            why = "ended" if seen.trainer.ok else f"failed: {seen.trainer.error}"
            if self._count("trainer") > self.max_trainer_restarts:
                self.state = RunState.FAILED
                return out + [Fail(f"the continual trainer {why} {self.max_trainer_restarts} times; stopping (rerun "
                                   "the same command to resume from the last checkpoint)")]
            out.append(RestartTrainer(why, seen.trainer.value if seen.trainer.ok else None))
        if seen.server == "dead":
            self._count("server")
            out.append(RestartServer())
        elif seen.server == "alive" and seen.server_version is not None:
            out.append(ServedVersion(seen.server_version))
        return out

    def _count(self, part: str) -> int:
        self.restarts[part] = self.restarts.get(part, 0) + 1
        return self.restarts[part]
