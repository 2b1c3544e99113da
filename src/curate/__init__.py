"""Data curation: duplicates, leakage between splits, label conflicts, a cleaned manifest.

``python -m src.curate data=<name>`` (see :mod:`src.curate.cli`, ``conf/curate.yaml``).
In process::

    from src.curate import Settings, curate_records, write_outputs
    res = curate_records(load_data(cfg.data).records, Settings(hamming=6))
    write_outputs(res, "outputs/curate/mine")   # manifest.jsonl -> data.manifest=...

Modules: :mod:`.hashing` (decoded-pixel and perceptual hashes, in parallel),
:mod:`.search` (blocked Hamming / cosine pair search, union-find), :mod:`.groups`
(edge kinds, groups, leakage and conflict counts), :mod:`.manifest` (the cleaning
policy), :mod:`.embeddings` (optional network features), :mod:`.report` (CSV, gallery,
embedding plot), :mod:`.core` (the whole run).
"""
from .core import Result, Settings, cross_dataset, curate_records, summarise, write_outputs  # noqa: F401
from .groups import KINDS, Edges, Group, build_groups, find_edges, group_stats  # noqa: F401
from .hashing import ImageHashes, canonical_array, hash_file, hash_files  # noqa: F401
from .manifest import Policy, apply_policy  # noqa: F401
from .search import UnionFind, cosine_pairs, hamming_cross, hamming_pairs  # noqa: F401
