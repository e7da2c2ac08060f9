"""Pure formats: bytes <-> frozen objects. No I/O, no crypto, no clock."""
