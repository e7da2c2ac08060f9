"""The hypervisor: one wasmtime sandbox per microservice, the host ABI, gateways, supervision."""
