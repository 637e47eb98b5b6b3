"""Request routing for the model and batcher deployments: aborts must reach the replica running
the sequence, and a variant's micro-batches should reach a model replica that holds it.

A micro-batch is one long streaming call to one model replica, so cancelling a single request
of it cannot cancel the call. Instead the batcher sends ``abort(request_ids, replica_id=...)``;
this router delivers any call that names a ``replica_id`` to exactly that replica. A call for a
variant (a multiplexed model id) goes first to the replicas that hold it, then to those holding
the fewest variants (which load it), then to any. Everything else is routed by the usual
power-of-two-choices on queue length.
"""

from __future__ import annotations

import random

from ray.serve.request_router import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

TARGET_REPLICA_KWARG = "replica_id"


class ReplicaAffinityRouter(FIFOMixin, MultiplexMixin, LocalityMixin, RequestRouter):
    """Routes calls naming a replica to that replica, a variant's calls to the replicas that
    hold it first, the rest by power of two choices."""

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
        variant = pending_request.metadata.multiplexed_model_id if pending_request else ""
        if variant:
            ranks = self.rank_replicas_via_multiplex(candidate_replicas, variant)
            return [_two_of(rank) for rank in ranks if rank]
        return [_two_of(candidate_replicas)]


def _two_of(replicas: list[RunningReplica]) -> list[RunningReplica]:
    """Power of two choices: Serve sends the call to the shorter queue of two random ones."""
    return replicas if len(replicas) <= 2 else random.sample(replicas, 2)
