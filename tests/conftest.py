"""Shared fixtures. `toy_world` is a small toy world (see toyworld.py), built once per test session."""
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub lookup without network spends ~28 s on DNS retries before failing
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's flat modules
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests' helpers: `from checkpoints import ...`

import pytest  # noqa: E402

# Small enough to build in about a second, big enough to hold every kind of record: 3 pool shards, 60 wrong captions,
# one broken record of each kind, text-only and multi-turn SFT conversations, all MMBench categories.
TOY_WORLD = dict(seed=0, n_pool=600, n_sft=200, n_eval=60, image_size=64, wrong_share=0.1, shard_size=200)


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory) -> str:
    """Path (str) of a small toy world built with TOY_WORLD; its manifest.json describes what is in it."""
    import toyworld

    root = str(tmp_path_factory.mktemp("toyworld") / "world")
    toyworld.build(root, **TOY_WORLD)
    return root
