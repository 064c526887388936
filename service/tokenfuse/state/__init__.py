"""The state layer: the only code that names Redis keys (`keys`) or loads Lua (`scripts`).

`budgets` (processor decisions), `admin` (operator budget access), `pools` (key pools and
gateway keys), `control` (the operator change channel), `connection` (clients, failures),
`redis_pipe` (the decisions' pipelined connection)."""
