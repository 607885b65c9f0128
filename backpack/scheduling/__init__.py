"""Scheduling: the query scheduler (an actor routing batches to teacher replicas and writing their answers),
the intake stream a continual run reads prompts from, the routing policies and the ensemble rules."""
