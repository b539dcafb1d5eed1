"""Sessions: the model, the policy, the session service and its live-image glue."""
