"""Data curation: duplicates, leakage between splits, label conflicts, a cleaned manifest.

``python -m src.curate data=<name>`` (see :mod:`src.curate.cli`, ``conf/curate.yaml``).
In process::

    from src.curate import Settings, curate_records, write_outputs
    res = curate_records(load_data(cfg.data).records, Settings(hamming=6))
    write_outputs(res, "outputs/curate/mine")   # manifest.jsonl -> data.manifest=...

The detection core lives one layer down, in :mod:`src.data.dedup` (``load_data`` uses it
for ``data.duplicates``): decoded-pixel and perceptual hashes (``hashing``, cached on disk
by ``cache``), blocked Hamming / cosine pair search and union-find (``search``), duplicate
pairs of each kind (``edges``) and which copy a group keeps (``resolve.plan_drops``).
Here, on top: :mod:`.groups` (groups, leakage and conflict counts), :mod:`.manifest` (the
cleaning policy), :mod:`.embeddings` (optional network features), :mod:`.report` (CSV,
gallery, embedding plot), :mod:`.core` (the whole run), :mod:`.cli`.
"""
from ..data.dedup import (KINDS, Edges, ImageHashes, UnionFind, canonical_array, cosine_pairs,  # noqa: F401
                          find_edges, hamming_cross, hamming_pairs, hash_file, hash_files)
from .core import Result, Settings, cross_dataset, curate_records, summarise, write_outputs  # noqa: F401
from .groups import Group, build_groups, group_stats  # noqa: F401
from .manifest import Policy, apply_policy  # noqa: F401
