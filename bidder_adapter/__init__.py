"""bidder_adapter."""
