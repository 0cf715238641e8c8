"""Lua scripts that still run after Redis lost its script cache (a restart or a failover).

On a connection a script runs by its digest (EVALSHA) and is loaded again when Redis answers
NOSCRIPT, as redis-py's ``Script`` does. In a pipeline it runs by its text (EVAL): a pipeline
checks its scripts once, before it is sent, and when redis-py sends it again after a
reconnect, to a Redis that restarted meanwhile, every EVALSHA in it would fail with NOSCRIPT
while its other commands succeed: the writes those scripts make (a learner's trail, a
settled contact) would be lost without a word.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
from redis.client import Pipeline
from redis.commands.core import Script

_loaded: dict[str, Script] = {}


def run(
    client: redis.Redis | Pipeline, source: str, keys: Sequence[Any], args: Sequence[Any] = ()
) -> Any:
    """Run the Lua ``source`` with ``keys`` and ``args``: its reply, or, on a pipeline, the
    pipeline (the reply comes with the pipeline's)."""
    if isinstance(client, Pipeline):
        return client.eval(source, len(keys), *keys, *args)
    script = _loaded.get(source)
    if script is None:
        script = _loaded[source] = client.register_script(source)
    return script(keys=list(keys), args=list(args), client=client)
