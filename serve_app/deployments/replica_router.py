"""Request routing for the model deployment: aborts must reach the replica running the sequence.

A micro-batch is one long streaming call to one model replica, so cancelling a single request
of it cannot cancel the call. Instead the batcher sends ``abort(request_ids, replica_id=...)``;
this router delivers any call that names a ``replica_id`` to exactly that replica and routes
everything else by the usual power-of-two-choices on queue length.
"""

from __future__ import annotations

import random

from ray.serve.request_router import (
    FIFOMixin,
    LocalityMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

TARGET_REPLICA_KWARG = "replica_id"


class ReplicaAffinityRouter(FIFOMixin, LocalityMixin, RequestRouter):
    """Routes calls naming a replica to that replica, the rest by power of two choices."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """Rank the replicas that may take ``pending_request``."""
        target = pending_request.kwargs.get(TARGET_REPLICA_KWARG) if pending_request else None
        if target is not None:
            matches = [r for r in candidate_replicas if r.replica_id.unique_id == target]
            return [matches] if matches else []
        if len(candidate_replicas) <= 2:
            return [candidate_replicas]
        return [random.sample(candidate_replicas, 2)]
