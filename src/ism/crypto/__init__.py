"""Keys, COSE and SUIT authentication: the sole user of ``cryptography``."""
