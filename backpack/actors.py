"""The one place where plain classes become Ray actors.

Nothing else in Backpack applies `ray.remote`: teachers, the scheduler and the store are plain classes that
tests construct in-process; here they get their resource options and become actors.
"""

from __future__ import annotations

import ray

from backpack.core.config import TeacherConfig
from backpack.scheduler import Scheduler
from backpack.teachers.base import TeacherHost


def teacher_options(cfg: TeacherConfig) -> dict:
    """Ray options for one replica of `cfg`: its CPUs, GPUs and custom resources."""
    return dict(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, resources=dict(cfg.resources),
                # A dead replica stays dead: the scheduler re-routes its work, and a fresh model load
                # mid-run would only add latency on a laptop.
                max_restarts=0, max_task_retries=0,
                runtime_env={"env_vars": {"OMP_NUM_THREADS": str(cfg.threads),
                                          "TOKENIZERS_PARALLELISM": "false"}})


def spawn_teacher(cfg: TeacherConfig, replica: str):
    return ray.remote(TeacherHost).options(**teacher_options(cfg)).remote(cfg, replica)


def spawn_scheduler(*args, **kwargs):
    # The scheduler only waits on teachers and writes shards: it needs no CPU reservation of its own.
    return ray.remote(Scheduler).options(num_cpus=0, max_restarts=0).remote(*args, **kwargs)


def spawn_server(student_cfg, serve_cfg, registry, model_name: str = "backpack-student", **kwargs):
    """The StudentServer as an async actor: its HTTP server and registry follower run on the actor's loop."""
    from backpack.student.server import StudentServer

    return ray.remote(StudentServer).options(
        num_cpus=serve_cfg.num_cpus, max_restarts=0,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(serve_cfg.threads), "TOKENIZERS_PARALLELISM": "false"}},
    ).remote(student_cfg, serve_cfg, registry, model_name, **kwargs)


def spawn_continual_trainer(*args, **kwargs):
    """`run_continual_training` as a Ray task (it starts the Ray Train run and waits on it, so it needs no CPU
    of its own); the ObjectRef resolves to its TrainResult when the run stops, or raises when it failed."""
    from backpack.student.continual import run_continual_training

    return ray.remote(num_cpus=0, max_retries=0)(run_continual_training).remote(*args, **kwargs)
