"""The Serve deployments of the graph, one class per file: ingress, response cache, batcher,
model server, rate limiter, and the replica router the model server routes with."""
