"""Rank functions of the object-storage tests (module level, so they pickle by reference): each
first points the rank's S3 client at the test server (the worlds are spawned before the server)."""

from __future__ import annotations

import os

from tests.helpers import build_mlp, full_state, mlp_step


def fsdp_save(env: dict, url: str, steps: int = 3) -> dict:
    """Train an FSDP2 MLP ``steps`` steps and save it to ``url``; its full state."""
    import ucp

    os.environ.update(env)
    model, opt = build_mlp("fsdp", seed=0)
    for s in range(steps):
        mlp_step(model, opt, s)
    with ucp.Checkpointer(url, model=model, optimizer=opt) as ck:
        ck.save(steps)
    return _detached(full_state(model, opt))


def fsdp_load(env: dict, url: str) -> dict:
    """A fresh FSDP2 MLP (another init, optimizer never stepped) loaded from ``url``; its full state."""
    import ucp

    os.environ.update(env)
    model, opt = build_mlp("fsdp", seed=1)
    with ucp.Checkpointer(url, model=model, optimizer=opt) as ck:
        result = ck.load()
    return {"step": result.step, "state": _detached(full_state(model, opt))}


def _detached(state: dict) -> dict:
    return {k: v.detach() for k, v in state.items()}  # (a tensor that requires grad does not cross processes)


def fsdp_load_counted(env: dict, url: str) -> dict:
    """:func:`fsdp_load`, with the S3 requests this rank made during the load: ``requests``, a list of
    ``(operation, key below the checkpoint's root, range asked or "")``."""
    import s3fs

    made: list = []
    real = s3fs.S3FileSystem._call_s3

    async def counted(self, method, *args, **kwargs):
        key = kwargs.get("Key") or kwargs.get("Prefix") or ""
        made.append((method, key.split(url.removeprefix("s3://").split("/", 1)[1], 1)[-1].lstrip("/"),
                     kwargs.get("Range", "")))
        return await real(self, method, *args, **kwargs)

    s3fs.S3FileSystem._call_s3 = counted
    try:
        return {**fsdp_load(env, url), "requests": made}
    finally:
        s3fs.S3FileSystem._call_s3 = real
