"""How the ingress and model servers call helper deployments without ever failing a request."""
