"""Pure trust decisions of the device: no files, clock, network, randomness or wasm."""
