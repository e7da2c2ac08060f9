"""The device: trust anchors, anti-rollback counters, secure and measured boot, storage."""
