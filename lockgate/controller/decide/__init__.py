"""Decide: the rollout spec, the stage machine, the analysis that turns stored observations into a
verdict (through the pure ``controller.stats`` core), the promotion loop that moves weights, the
rollout store, ramp planning and the offline replay (``lockgate analyze``)."""
