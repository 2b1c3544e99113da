"""Duplicate images: hashes, pair search, groups, and what ``load_data`` does with them.

The core that both :func:`src.data.dataset.load_data` (``data.duplicates: keep | group |
drop``) and the curation CLI (:mod:`src.curate`, which adds reports, a gallery and
cleaned manifests on top) use:

* :mod:`.hashing`: an exact hash of the *decoded* pixels and 256-bit perceptual hashes
  (optionally of the mirrored image), in a thread pool;
* :mod:`.cache`: those hashes on disk, one row per file keyed by path, size and mtime;
* :mod:`.search`: blocked Hamming / cosine pair search in NumPy, union-find;
* :mod:`.edges`: duplicate pairs by kind (exact, near, flip, embedding) and group counts;
* :mod:`.resolve`: the ``load_data`` step (group copies into one split group, or keep one
  copy per group), the fixed-split policy and the summary.
"""
from .cache import HashCache, hash_files_cached  # noqa: F401
from .edges import KINDS, Edges, find_edges, level_counts, split_name  # noqa: F401
from .hashing import ImageHashes, canonical_array, hash_file, hash_files  # noqa: F401
from .resolve import MODES, DuplicateSettings, Resolved, plan_drops, resolve_duplicates  # noqa: F401
from .search import UnionFind, cosine_pairs, hamming_cross, hamming_pairs  # noqa: F401
