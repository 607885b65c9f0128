"""Ray Job entry points: thin wrappers that parse, validate and call Backpack (see each module's docstring).

    jobs.distill   backpack run        generate, train, evaluate, report
    jobs.generate  backpack generate   the dataset only
    jobs.train     backpack train      training only (resumes from the run's last checkpoint)

The cluster's nodes need Backpack's dependencies installed (`make install` on each node, or an image with it);
`--working-dir .` ships this code. Set RAY_AUTH_MODE the same way for `ray start` and `ray job submit`
(token auth is on by default in Ray 2.60). On several nodes, give `storage.path` an object store
(`s3://bucket/runs`, credentials in each node's environment) or a directory every node mounts at the same path
with `storage.shared=true`, and `redis.url` a Redis server every node reaches (a multi-node run refuses the
embedded Redis and an unshared folder). Follow a job with `ray job logs --follow JOB_ID`; the
docs/guides/cluster.md has the whole submit line.
"""
