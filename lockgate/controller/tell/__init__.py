"""Tell: everything that leaves the controller for people and other systems: alerts and their sinks,
the notification outbox, the deployment log (history), diagnosis, reports and the model registry."""
