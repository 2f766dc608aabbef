"""atlasflow: AbdomenAtlas-style CT labelling at scale.

The import package `atlasflow` is this directory (`services/`): one subpackage per service
(`ingest`, `segmentation`, `ranking`, `labels`), the shared runtime in `common`, the command
line in `cli`. Services meet only through the generated protobuf modules (`<service>.v1`)
and `common`.
"""

__version__ = "0.1.0"
