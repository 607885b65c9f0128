"""The one place where plain classes become Ray actors.

Nothing else in Backpack applies `ray.remote`: teachers, the scheduler and the store are plain classes that
tests construct in-process; here they get their resource options and become actors (whose constructors also
warm Ray's Arrow serialization up: `warm_arrow_serialization`).
"""

from __future__ import annotations

import functools

import pyarrow as pa
import ray

from backpack.config import TeacherConfig
from backpack.scheduling.scheduler import Scheduler
from backpack.teachers.host import TeacherHost


def warm_arrow_serialization() -> None:
    """Have Ray serialize a small Arrow table once. Ray's first one in a process imports pandas and some 400
    more modules for its Arrow reducer (0.18-0.27 s measured here); done in an actor's constructor, that is part
    of the actor's start, not of the first batch it sends or answers (2% of a 64-prompt benchmark batch)."""
    ray.put(pa.table({"warm": [0]}))


@functools.cache
def _ready_class(cls: type) -> type:
    """`cls` under its own name (actors are listed by class name), its constructor ending with the warm-up."""
    def __init__(self, *args, **kwargs):
        cls.__init__(self, *args, **kwargs)
        warm_arrow_serialization()

    return type(cls.__name__, (cls,), {"__init__": __init__, "__doc__": cls.__doc__, "__module__": __name__})


def teacher_options(cfg: TeacherConfig) -> dict:
    """Ray options for one replica of `cfg`: its CPUs, GPUs and custom resources."""
    opts = dict(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, resources=dict(cfg.resources),
                # A dead replica stays dead: the scheduler re-routes its work, and a fresh model load
                # mid-run would only add latency on a laptop.
                max_restarts=0, max_task_retries=0,
                runtime_env={"env_vars": {"OMP_NUM_THREADS": str(cfg.threads),
                                          "TOKENIZERS_PARALLELISM": "false"}})
    if cfg.dynamic_batching():
        # A threaded actor: all max_in_flight generate calls wait in its batcher at once (one thread runs the
        # model), and two more threads keep ready / peak_memory answering meanwhile.
        opts["max_concurrency"] = cfg.max_in_flight + 2
    return opts


def spawn_teacher(cfg: TeacherConfig, replica: str, placement_group=None, bundle: int = 0, ledger=None):
    """One teacher replica; in bundle `bundle` of `placement_group` when its teacher reserves its replicas
    together (teacher.placement other than "any"); asking the QueryLedger `ledger` first when given."""
    opts = teacher_options(cfg)
    if placement_group is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=placement_group, placement_group_bundle_index=bundle)
    return ray.remote(_ready_class(TeacherHost)).options(**opts).remote(cfg, replica, ledger)


def reserve_replicas(cfg: TeacherConfig):
    """A placement group with one bundle per replica of `cfg`, by its placement strategy (not yet ready)."""
    from ray.util.placement_group import placement_group

    return placement_group([cfg.bundle()] * cfg.replicas, strategy=cfg.placement.upper(),
                           name=f"teacher-{cfg.name}-{id(cfg):x}")


def on_driver_node():
    """Pin an actor or task to the driver's node. A coordinator that reserves no CPU could otherwise land on
    any node, a teacher node among them, and that node's death would end the whole run, not just a replica."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def spawn_scheduler(*args, **kwargs):
    # The scheduler only waits on teachers and writes shards: it needs no CPU reservation of its own.
    return ray.remote(_ready_class(Scheduler)).options(num_cpus=0, max_restarts=0,
                                                       scheduling_strategy=on_driver_node()).remote(*args, **kwargs)


def spawn_server(student_cfg, serve_cfg, registry, model_name: str = "backpack-student", **kwargs):
    """The StudentServer as an async actor: its HTTP server and registry follower run on the actor's loop."""
    from backpack.serve.server import StudentServer

    return ray.remote(StudentServer).options(
        num_cpus=serve_cfg.num_cpus, resources=dict(serve_cfg.resources), max_restarts=0,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(serve_cfg.threads), "TOKENIZERS_PARALLELISM": "false"}},
    ).remote(student_cfg, serve_cfg, registry, model_name, **kwargs)


def spawn_continual_trainer(*args, **kwargs):
    """`run_continual_training` as a Ray task (it starts the Ray Train run and waits on it, so it needs no CPU
    of its own); the ObjectRef resolves to its TrainResult when the run stops, or raises when it failed."""
    from backpack.student.continual import run_continual_training

    return ray.remote(num_cpus=0, max_retries=0, scheduling_strategy=on_driver_node())(
        run_continual_training).remote(*args, **kwargs)
