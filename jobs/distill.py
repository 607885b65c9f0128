"""Ray Job: generate the dataset (reusing answered prompts), train the student, evaluate it, write the report.

Submit from the repository root to a running cluster (its dashboard address, port 8265 by default):

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.distill --config examples/quickstart.yaml storage.path=/shared/runs storage.shared=true

What the cluster needs (dependencies, RAY_AUTH_MODE, shared storage and Redis): see jobs/__init__.py.
"""

import sys

from jobs._entry import run

if __name__ == "__main__":
    sys.exit(run("run"))
