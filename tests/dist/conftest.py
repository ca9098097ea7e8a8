import pytest

from tests.dist.world import World


@pytest.fixture(scope="session")
def worlds():
    """Shared gloo worlds by size; a broken one is replaced; all are shut down at the end."""
    pool: dict[int, World] = {}

    def get(size: int) -> World:
        w = pool.get(size)
        if w is None or w.broken:
            if w is not None:
                w.close()
            w = pool[size] = World(size)
        return w

    yield get
    for w in pool.values():
        w.close()


@pytest.fixture
def world2(worlds):
    return worlds(2)


@pytest.fixture
def world4(worlds):
    return worlds(4)
