"""Peripherals behind logical resources: the protocol and the virtual (simulated) board."""
