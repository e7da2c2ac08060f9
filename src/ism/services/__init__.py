"""Per-microservice services reached through the host ABI: storage, crypto, identity, attestation.

Owns: the services each microservice gets from the iSM, bound to its identity
(the owner UUID is supplied by the host, never by the guest).
Must not import: agent, store, cli, runtime, hostlink.
"""
