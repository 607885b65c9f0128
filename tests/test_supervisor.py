"""The continual run's supervisor (backpack/run/supervisor.py): what the driver does about what it sees of its
parts, decided without Ray (the driver's Ray side is tests/test_continual.py)."""

from backpack.run.supervisor import (Ended, Fail, Observation, RespawnTeacher, RestartScheduler, RestartServer,
                                     RestartTrainer, RunState, ServedVersion, Stop, Supervisor)


def running(**kw) -> Supervisor:
    s = Supervisor(**kw)
    s.running()
    return s


def test_nothing_is_watched_before_every_part_started():
    s = Supervisor()
    assert s.state is RunState.STARTING
    assert s.decide(Observation(dead_replicas=("t/0",), server="dead")) == []
    s.running()
    assert s.state is RunState.RUNNING


def test_healthy_parts_only_advertise_the_served_version():
    s = running()
    assert s.decide(Observation(server_version=3)) == [ServedVersion(3)]
    assert s.decide(Observation(server="busy")) == []   # loading a version: alive, nothing to advertise
    assert s.restarts == {}


def test_each_part_that_died_is_started_again_in_order():
    s = running()
    died = Ended(False, error="ActorDiedError: the scheduler died")
    got = s.decide(Observation(dead_replicas=("a/0", "b/1"), scheduler=died,
                               trainer=Ended(True, value=42), server="dead"))
    assert got == [RespawnTeacher("a/0"), RespawnTeacher("b/1"), RestartScheduler(died),
                   RestartTrainer("ended", 42), RestartServer()]
    # a teacher counts once it is back (a failed respawn is tried again next round); the others when restarted
    assert s.restarts == {"scheduler": 1, "trainer": 1, "server": 1}
    s.respawned("a/0")
    assert s.restarts["teacher"] == 1


def test_a_failed_trainer_says_why_and_resumes_without_a_step():
    s = running()
    assert s.decide(Observation(trainer=Ended(False, error="ValueError: bad rows"))) == [
        RestartTrainer("failed: ValueError: bad rows", None)]


def test_the_trainer_failing_past_its_restarts_fails_the_run():
    s = running(max_trainer_restarts=2)
    failed = Observation(trainer=Ended(False, error="RuntimeError: boom"))
    assert [type(d) for d in s.decide(failed)] == [RestartTrainer]
    assert [type(d) for d in s.decide(failed)] == [RestartTrainer]
    third = s.decide(failed)
    assert third == [Fail("the continual trainer failed: RuntimeError: boom 2 times; stopping (rerun the same "
                          "command to resume from the last checkpoint)")]
    assert s.state is RunState.FAILED and s.decide(Observation(server="dead")) == []


def test_a_stop_wins_and_nothing_is_restarted_after_it():
    s = running()
    # the scheduler ended because of the stop flag, seen in the same look: it is not restarted
    assert s.decide(Observation(stop_requested=True, scheduler=Ended(True, value={"ok_rows": 3}),
                                dead_replicas=("a/0",))) == [Stop("stop requested")]
    assert s.state is RunState.STOPPING
    assert s.decide(Observation(trainer=Ended(True, value=9), server="dead")) == [] and s.restarts == {}


def test_stopping_from_outside_keeps_a_failure():
    s = running()
    s.stopping()
    assert s.state is RunState.STOPPING
    failed = running(max_trainer_restarts=0)
    failed.decide(Observation(trainer=Ended(False, error="x")))
    failed.stopping()
    assert failed.state is RunState.FAILED
