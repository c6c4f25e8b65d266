"""The promote stage's logic: the gate's policy and the rollout on Ray Serve."""
