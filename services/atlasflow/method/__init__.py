"""The method: attention, plausibility and ranking, as one library that the segmentation
pipeline and the ranking tools share (no service code, no grpc).

Module map:

- `atlasflow.method.masks`: 3x3x3 morphology, bounding boxes, 26-connected components, the
  recipe's per-model masking;
- `atlasflow.method.attention`: the AbdomenAtlas recipe's terms (std, entropy, overlap) per
  organ and per case (`case_attention`);
- `atlasflow.method.geometry`: organ volume, centroid, FOV cut, components;
- `atlasflow.method.prior`: the population prior (bundled ``plausibility_prior.json``);
- `atlasflow.method.findings`: plausibility findings against the prior, pointers, and the
  segmentation worker's per-organ findings (`organ_findings`);
- `atlasflow.method.suspect`: the enhanced attention's suspect regions;
- `atlasflow.method.strategy`: the `RankingStrategy` protocol, its registry and `rank_case`;
- `atlasflow.method.reference`, `atlasflow.method.enhanced`, `atlasflow.method.learned`: the
  registered strategies.

Importing the package registers the built-in strategies (``reference`` first, then
``enhanced``, then ``learned``); a new strategy module is imported here too.
"""

# Registration order is the order of `strategy_names()`: the default, ``reference``, first.
from atlasflow.method import reference  # noqa: F401  (registers "reference")

# isort: split
from atlasflow.method import enhanced  # noqa: F401  (registers "enhanced")

# isort: split
from atlasflow.method import learned  # noqa: F401  (registers "learned")
