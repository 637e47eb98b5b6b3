"""State kept by the cluster-wide deployments, apart from the deployment and its client."""
