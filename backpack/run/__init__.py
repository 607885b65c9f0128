"""The drivers: what each command does, and the one place plain classes become Ray actors.

    synthesize.py  backpack synthesize   seed tasks -> teachers write prompts -> curated prompt set
    generate.py    backpack generate     prompts -> teachers -> dataset (resumable)
    train.py       backpack train        Ray Train on the dataset (resumes from the last checkpoint)
    evaluate.py    backpack eval         versions scored on held-out rows, the report
    continual.py   backpack run --continual   the continual loop's driver; supervisor.py decides what it does
    ops.py         ingest, status, versions, promote, rollback: beside a run
    generation.py  the teachers, recall and schedulers of a run (batch and continual alike)
    actors.py      ray.remote applied here and nowhere else; pool.py: the teacher replicas as actors
"""
