"""Provider key pools: secrets from the operator's files (memory only) and health probes.
Their shared state in Redis is `tokenfuse.state.pools`."""
