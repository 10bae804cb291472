"""API: the controller's HTTP front end (feedback, observations, rollout API, ``/metrics``)."""
