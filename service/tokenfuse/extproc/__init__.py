"""The ext_proc processor: the gRPC stream dispatcher (`service`), one module per phase
(`request`, `response`, `settlement`), the pooled-attempt upstream stage (`upstream`),
the answers it sends (`answers`) and what the phases share (`runtime`, `exchange`)."""
