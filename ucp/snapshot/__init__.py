"""The memory tier: a rank's snapshot slots in the shared memory of its node's agent (``memory``,
``shm``, ``header``), the agent process and how trainers find and talk to it (``agent``,
``agent_state``, ``discovery``, ``client``), its durable writes (``persist``), and erasure-coded
parity across nodes with the rebuild of lost ranks (``parity``, ``recovery``)."""
