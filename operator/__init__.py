"""The Signalbox Kubernetes operator (kopf): CRDs in, compiled routing config and status out."""
