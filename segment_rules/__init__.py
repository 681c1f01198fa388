"""segment_rules."""
