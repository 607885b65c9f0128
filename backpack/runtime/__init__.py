"""The runtime every part stands on: Ray (a local cluster or an address, placement checks), Redis (embedded or a
URL, the run's keys), the run session (lock, Redis, Ray, teardown), progress reporting, the training workers'
memory allocator, and a multi-node local cluster for trying scale-out on one machine."""
