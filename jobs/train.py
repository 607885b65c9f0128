"""Ray Job: train the run's student on its dataset (resumes from its last checkpoint).

Submit from the repository root to a running cluster (its dashboard address, port 8265 by default):

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.train --config examples/quickstart.yaml storage.path=/shared/runs

The cluster's nodes need Backpack's dependencies installed (the Docker image, or `make install` on each node);
`--working-dir .` ships this code. Set RAY_AUTH_MODE the same way for `ray start` and `ray job submit`
(token auth is on by default in Ray 2.60). On several nodes, give `storage.path` a directory every node sees
and `redis.url` a Redis server every node reaches. Follow it with `ray job logs --follow JOB_ID`.
"""

import sys

from jobs._entry import run

if __name__ == "__main__":
    sys.exit(run("train"))
