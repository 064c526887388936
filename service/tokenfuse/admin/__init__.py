"""The operator surface: one admin service (protos/tokenfuse/admin/v1/admin.proto) behind the
CLI, the JSON API (Envoy's gRPC-JSON transcoder on the admin listener) and the dashboard."""
