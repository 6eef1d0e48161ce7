"""RL algorithms driving the policy and generation groups."""
