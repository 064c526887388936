"""tokenfuse: a fail-closed firewall for LLM traffic (Envoy ext_proc + Redis Lua)."""

__version__ = "0.1.0"
